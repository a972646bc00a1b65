"""A trained run restored for evaluation, export or search: its model, once.

`load_trained_model` restores one run's latest checkpoint (its config.json's
model, the checkpoint's params and batch statistics, no optimizer state) as
an `extract.TrainedModel`; `restore_members` restores the runs an evaluation
config names (config.eval.ensemble's members, or one workdir), each rebuilt
from its own config.json. `evaluate`, `export` and `search` restore through
them, so they build the same models from the same files.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import ml_collections

from landmark_jax.models.factory import create_model
from landmark_jax.retrieval import ensemble
from landmark_jax.retrieval.extract import TrainedModel
from landmark_jax.training import train_steps
from landmark_jax.workdir import checkpointing, run_config


def load_trained_model(
    config: ml_collections.ConfigDict, workdir: str, purpose: str = "nothing to evaluate"
) -> TrainedModel:
    """Restores a run's latest checkpoint once: model and head, no optimizer state.

    Args:
      config: the run's own config (run_config.evaluation_config(cli, workdir)).
      workdir: the run's workdir.
      purpose: what a missing checkpoint means, to open its message with.

    Returns:
      The TrainedModel, its variables on the host (they load on any device
      count; extraction places them on its devices).

    Raises:
      FileNotFoundError: the workdir has no checkpoint.
    """
    stage = checkpointing.load_stage(workdir, purpose)
    return TrainedModel(
        config,
        workdir,
        stage["step"],
        create_model(config.model),
        train_steps.model_variables(stage),
        stage["params"]["head"],
    )


def restore_members(
    config: ml_collections.ConfigDict,
    workdir: str | None,
    model_overrides: Mapping[str, Any] | None = None,
    purpose: str = "nothing to evaluate",
) -> tuple[list[ensemble.EnsembleMember], list[TrainedModel]]:
    """The models a config's eval block names, each restored once.

    config.eval.ensemble's members, else `workdir` alone (weight 1.0, its own
    image size); each model is rebuilt from its own config.json
    (run_config.evaluation_config), with `config`'s data_dir and eval block.

    Args:
      config: the command line's config (its eval block).
      workdir: the run (unused when config.eval.ensemble lists members).
      model_overrides: model keys given on the command line, flat
        ('model.input_normalization' -> value); each must equal every
        member's config.json.
      purpose: what a missing checkpoint means (load_trained_model).

    Returns:
      (the members, their restored models), in the same order.

    Raises:
      ValueError: a bad ensemble entry, no workdir and no ensemble, or a model
        key that disagrees with a config.json.
      FileNotFoundError: a member without config.json or a checkpoint (named).
    """
    if config.eval.ensemble:
        members = ensemble.ensemble_members_from_config(config.eval.ensemble)
    elif workdir:
        members = [ensemble.EnsembleMember(workdir, 1.0, None)]
    else:
        raise ValueError("give a --workdir, or ensemble members in config.eval.ensemble")
    models = [
        load_trained_model(
            run_config.evaluation_config(config, member.workdir, model_overrides),
            member.workdir,
            purpose,
        )
        for member in members
    ]
    return members, models
