"""What training bought: retrieval baselines scored like the learned model.

A learned descriptor is judged against descriptors computed the same way, on
the same queries, with the same metric code (evaluation.evaluate runs them
when `eval.baselines` names them):

- `untrained`: the run's own initial model (its seed, its architecture, and
  what it started from: `init.checkpoint` or `init.backbone`), extracted
  exactly as the trained one (same sizes, scales, flip);
- `raw_pixels`: each image resized to `eval.raw_pixel_size` squared, its
  pixels centred (the image's mean removed) and L2-normalised: cosine
  similarity of raw pixels;
- `chance`: the expected mAP@k of a uniformly random ranking of the index,
  in closed form (no sampling noise).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from landmark_jax.models import backbone_checkpoint
from landmark_jax.models.factory import create_model
from landmark_jax.retrieval import extract
from landmark_jax.training import random_streams, train_steps
from landmark_jax.workdir import checkpointing


class RawPixels(nn.Module):
    """The raw-pixel descriptor: an image's pixels as one vector, its mean removed.

    Extraction L2-normalises it, so kNN on it ranks by the cosine of the
    centred pixels (the Pearson correlation of the two images).
    """

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        x = images.astype(jnp.float32).reshape(images.shape[0], -1)
        return x - jnp.mean(x, axis=-1, keepdims=True)


def raw_pixel_model(config: ml_collections.ConfigDict) -> extract.TrainedModel:
    """RawPixels as a model extraction takes (no variables, step 0)."""
    config = config.copy_and_resolve_references()
    config.model.descriptor = "embedding"  # RawPixels' output, whatever the run searches with
    return extract.TrainedModel(config, "", 0, RawPixels(), {}, {})


def untrained_model(config: ml_collections.ConfigDict, workdir: str) -> extract.TrainedModel:
    """The run's step-0 model: its seed's initialisation, then what it was
    initialised from (the previous stage's model, or converted backbone
    weights), as the trainer builds it.

    Args:
      config: the run's own config (run_config.evaluation_config).
      workdir: the run, for the record only.
    """
    module = create_model(config.model)
    keys = random_streams.run_keys(config.seed)
    variables = jax.jit(
        lambda key: random_streams.init_model_variables(module, key, config.image_size)
    )(keys.model)
    variables = jax.tree.map(np.asarray, variables)
    if config.init.checkpoint:
        stage = checkpointing.load_stage(config.init.checkpoint, "config.init.checkpoint")
        variables = train_steps.model_variables(stage)
    elif config.init.backbone:
        loaded = backbone_checkpoint.load_backbone_checkpoint(config.init.backbone)
        for key in ("params", "batch_stats"):
            if key in loaded:
                variables[key] = {**variables[key], "backbone": loaded[key]}
    return extract.TrainedModel(config, workdir, 0, module, variables, {})


def chance_map(
    solution: Mapping[str, Sequence[str]],
    index_ids: Sequence[str],
    max_predictions: int = 100,
    num_predictions: int | None = None,
) -> float:
    """The expected GLDv2 mAP@max_predictions of a uniformly random ranking.

    A query with R of its m relevant images among the N index images has a
    relevant image at rank i with probability R/N; given that, the expected
    precision at i is (1 + (i - 1)(R - 1)/(N - 1)) / i. AP sums over the
    ranks predicted (the first min(num_predictions, N)) and divides by
    min(m, max_predictions), as metrics.mean_average_precision does; the mean
    is over the solution's queries.

    Args:
      solution: query id -> relevant index ids (the scored queries).
      index_ids: the index's ids.
      max_predictions: the metric's cutoff (100 on Kaggle).
      num_predictions: ids ranked per query (eval.k); default max_predictions.
    """
    index = set(index_ids)
    n = len(index)
    k = min(max_predictions, num_predictions or max_predictions, n)
    ranks = np.arange(1, k + 1)
    total = 0.0
    for relevant in solution.values():
        m = len(set(relevant))
        r = len(set(relevant) & index)
        if not m or not r:
            continue
        together = (ranks - 1) * (r - 1) / (n - 1) if n > 1 else 0.0
        total += float(np.sum((r / n) * (1.0 + together) / ranks)) / min(m, max_predictions)
    return total / len(solution)
