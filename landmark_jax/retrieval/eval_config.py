"""The `eval` block of a config, checked before any model is restored.

`validate_eval_config` is what `evaluate` (and the TPU job's dry run) calls
first: every key of `config.eval` (base_config's) in range and among the
valid names, the ensemble's entries well formed, and the files it names
present. It lives with retrieval because its names (search backends,
baselines, resize modes) are retrieval's; the training schema (config_lib)
knows nothing of them.
"""

from __future__ import annotations

import math

import ml_collections

from landmark_jax import config_lib
from landmark_jax.data import data_format
from landmark_jax.retrieval import ensemble, knn, rerank, superglobal_extraction
from landmark_jax.runtime import file_io

# The baselines evaluation scores beside the learned model (baselines.py runs
# them). Their names are here, with the other names the eval block takes, so
# that checking a config (the TPU job's dry run, on a workstation) imports
# neither TensorFlow nor the extraction code.
BASELINES = ("untrained", "raw_pixels", "chance")


def validate_eval_config(config: ml_collections.ConfigDict) -> None:
    """Checks the `eval` block before any model is restored or image embedded.

    Args:
      config: a config with an `eval` block (base_config's keys).

    Raises:
      ValueError: a value out of range or not among the valid names, a
        malformed ensemble entry, or a solution file / Revisited folder that
        is set but does not exist; the message names the key.
    """
    ec = config.eval
    config_lib.check_choice(config, "eval.knn_backend", ec.knn_backend, knn.BACKENDS)
    rerank.parse_steps(ec.rerank)  # an unknown or malformed step, named
    if ec.rerank_recognition and not ec.rerank:
        raise ValueError(
            "config.eval.rerank_recognition=True re-ranks with config.eval.rerank's steps, "
            "but config.eval.rerank is empty"
        )
    if not ec.index_split:
        if not ec.revisited_data_dir:
            raise ValueError(
                "config.eval.index_split='' skips the GLDv2 retrieval and recognition: "
                "set config.eval.revisited_data_dir, or there is nothing to evaluate"
            )
        for key in (
            "retrieval_solution",
            "recognition_solution",
            "recognition_submission",
            "baselines",
            "ensemble",
        ):
            if ec[key]:
                raise ValueError(
                    f"config.eval.{key} needs the GLDv2 splits, but config.eval.index_split=''"
                )
    for key, minimum in (
        ("k", 1),
        ("recognition_k", 1),
        ("recall_queries", 1),
        ("classifier_top_m", 1),
        ("size_multiple", 1),
        ("gallery_queries", 0),
        ("raw_pixel_size", 1),
    ):
        config_lib.check_int(f"eval.{key}", ec[key], minimum)
    if ec.non_landmark_k is not None:  # None: recognition_k
        config_lib.check_int("eval.non_landmark_k", ec.non_landmark_k, 1)
    for key in ("recognition_power", "classifier_power", "non_landmark_weight"):
        config_lib.check_number(f"eval.{key}", ec[key], 0.0)
    if ec.image_size is not None:
        config_lib.check_int("eval.image_size", ec.image_size, 1)
    scales = tuple(ec.scales) if isinstance(ec.scales, (tuple, list)) else ec.scales
    if (
        not isinstance(scales, tuple)
        or not scales
        or not all(
            not isinstance(s, bool) and isinstance(s, (int, float)) and math.isfinite(s) and s > 0
            for s in scales
        )
    ):
        raise ValueError(
            f"config.eval.scales={ec.scales!r}: expected one or more positive numbers, "
            "e.g. (0.7071, 1.0, 1.4142)"
        )
    for key in ("resize", "revisited_resize"):
        config_lib.check_choice(config, f"eval.{key}", ec[key], data_format.RESIZE_MODES)
    _check_superglobal(ec, scales)
    if not isinstance(ec.recognition_submission, bool):
        raise ValueError(
            f"config.eval.recognition_submission={ec.recognition_submission!r}: expected True "
            "or False"
        )
    if ec.recognition_submission and not ec.train_split:
        raise ValueError(
            "config.eval.recognition_submission=True labels the test images by their nearest "
            "config.eval.train_split images, but config.eval.train_split=''"
        )
    if ec.index_split and not ec.test_split:
        raise ValueError("config.eval.test_split is empty: name a split of the data folder")
    for name in ec.baselines:
        config_lib.check_choice(config, "eval.baselines", name, BASELINES)
    if ec.baselines and not ec.retrieval_solution:
        raise ValueError(
            f"config.eval.baselines={tuple(ec.baselines)} scores retrieval: "
            "set config.eval.retrieval_solution too"
        )
    if ec.ensemble:
        try:
            ensemble.ensemble_members_from_config(ec.ensemble)
        except ValueError as e:
            raise ValueError(f"config.eval.ensemble: {e}") from e
    # A path the evaluation will read must exist; recognition (and so its
    # solution) is skipped when eval.train_split is empty.
    used = ["retrieval_solution", "revisited_data_dir"]
    if ec.train_split:
        used.append("recognition_solution")
    for key in used:
        path = ec[key]
        if path and not file_io.exists(path):
            raise ValueError(f"config.eval.{key}={path!r} does not exist")


def _check_superglobal(ec: ml_collections.ConfigDict, scales: tuple) -> None:
    """SuperGlobal's pooling keys (superglobal_extraction): switches, parameters, scales.

    Raises:
      ValueError: a switch that is not a bool, a parameter that is not a
        finite number > 0, an even window, Scale-GeM with one scale, or an
        the message names the key.
    """
    for key in superglobal_extraction.SWITCHES:
        if not isinstance(ec[key], bool):
            raise ValueError(f"config.eval.{key}={ec[key]!r}: expected True or False")
    for key in ("gem_plus_p", "regional_gem_p", "relu_plus_alpha"):
        value = ec[key]
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or not math.isfinite(value)
            or value <= 0
        ):
            raise ValueError(f"config.eval.{key}={value!r}: expected a finite number > 0")
    size = ec.regional_gem_size
    if isinstance(size, bool) or not isinstance(size, int) or size < 1 or size % 2 == 0:
        raise ValueError(
            f"config.eval.regional_gem_size={size!r}: expected an odd window side >= 1 "
            "(the released code's is 5)"
        )
    if ec.scale_gem and len(scales) < 2:
        raise ValueError(
            f"config.eval.scale_gem=True combines config.eval.scales, but there is one "
            f"({scales}): give several, e.g. (0.7071, 1.0, 1.4142) as SuperGlobal"
        )
