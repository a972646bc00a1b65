"""A run's random streams, all from `config.seed`, and its initial model.

Two streams: one initialises the model and the head, the other is folded
with the step number for each step's dropout and augmentation, so a resumed
run draws exactly what an uninterrupted one would. The trainer and the
evaluation's untrained baseline (retrieval/baselines.py) both derive the
initial model here, so that baseline is the run's own step-0 model.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class RunKeys:
    """model: initialises the model; head: the classifier head; steps: folded
    with each step number (`step_key`)."""

    model: jax.Array
    head: jax.Array
    steps: jax.Array


def run_keys(seed: int) -> RunKeys:
    """The run's keys from its seed."""
    init_key, steps = jax.random.split(jax.random.key(seed))
    model, head = jax.random.split(init_key)
    return RunKeys(model, head, steps)


def step_key(steps: jax.Array, step: jax.Array | int) -> jax.Array:
    """The key of one step: the same whatever the run did before it."""
    return jax.random.fold_in(steps, step)


def init_model_variables(module: Any, key: jax.Array, image_size: int) -> dict[str, Any]:
    """The model's initial variables ({'params', 'batch_stats'}), traceable.

    Args:
      module: the retrieval model (factory.create_model).
      key: RunKeys.model (also the dropout stream of the init call).
      image_size: the side of the square uint8 images the run trains on.
    """
    image = jnp.zeros((1, image_size, image_size, 3), jnp.uint8)
    variables = module.init({"params": key, "dropout": key}, image)
    return {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}
