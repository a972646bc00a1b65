"""On-disk layout of converted backbone weights, and loading them for training.

A backbone checkpoint is a folder:

    DIR/variables/     Orbax StandardCheckpointer save of
                       {'params': ..., 'batch_stats': ...} (numpy float32)
    DIR/backbone.json  {"arch": registry name, "input_normalization": the
                        name of the input_normalization.py preset the
                        weights need, "input_scale": [3 floats],
                        "input_offset": [3 floats] (that preset's values),
                        "input_channels": "rgb",
                        "padding": EfficientNet padding or null,
                        "source": where the weights came from}

The keras_import converter always records a preset name: `imagenet` for
keras.applications EfficientNet ImageNet weights (whether built with
weights='imagenet' or from the released .h5, whose Normalization variance
holds the std), `caffe` for ResNet (conv1 reordered to take RGB), or the one
given with --input_normalization where the weights do not establish it.

`python -m landmark_jax.models.keras_import` writes them; the trainer reads
them with `load_backbone_checkpoint` (variables) or `load_backbone` (module
and variables). Restoring checks every variable's name and shape against the
recorded arch first, because Orbax names neither on a mismatch.
"""

from collections.abc import Mapping
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from landmark_jax.models import backbones, input_normalization
from landmark_jax.runtime import file_io

CHECKPOINT_SUBDIR = "variables"
METADATA_FILE = "backbone.json"
# The backbone.json keys the trainer reads, each with whether it may be null
# (padding: null for a ResNet).
_METADATA_KEYS = {
    "arch": False,
    "input_normalization": False,
    "input_scale": False,
    "input_offset": False,
    "padding": True,
}


def check_output_is_new(output: str) -> None:
    """Raises ValueError if `output` already holds a backbone checkpoint."""
    if file_io.exists(file_io.join(output, CHECKPOINT_SUBDIR)):
        raise ValueError(f"{output} already holds a checkpoint; choose a new --output")


def save_backbone_checkpoint(
    output: str,
    arch: str,
    module: nn.Module,
    variables: Mapping[str, Any],
    source: Mapping[str, Any],
    *,
    input_normalization_name: str,
) -> dict[str, Any]:
    """Writes `variables` and the metadata to rebuild `module` into `output`.

    Args:
      output: the folder to create (or an empty existing one).
      arch: the registry name of `module`.
      module: the backbone; its input normalisation and padding are recorded.
      variables: {'params', 'batch_stats'}.
      source: provenance, stored as given.
      input_normalization_name: the preset the weights need, as the caller
        established it (recorded as given, not re-derived from floats);
        `module`'s input_scale/input_offset must be that preset's.

    Returns:
      The metadata written to backbone.json.

    Raises:
      ValueError: `output` already holds a checkpoint, an unknown preset
        name, or a module whose input affine is not that preset's.
    """
    check_output_is_new(output)
    preset = input_normalization.get_input_normalization(input_normalization_name)
    # The trainer rebuilds the module from input_scale/input_offset and checks
    # configs against the name: the two must not disagree.
    if not (
        np.allclose(module.input_scale, preset.scale, rtol=1e-6, atol=0)
        and np.allclose(module.input_offset, preset.offset, rtol=1e-6, atol=1e-7)
    ):
        raise ValueError(
            f"{output}: the module's input affine (scale {list(module.input_scale)}, "
            f"offset {list(module.input_offset)}) is not the {input_normalization_name!r} "
            f"preset (scale {list(preset.scale)}, offset {list(preset.offset)})"
        )
    output = file_io.checkpoint_path(output)
    metadata = {
        "arch": arch,
        "input_normalization": input_normalization_name,
        "input_scale": [float(s) for s in module.input_scale],
        "input_offset": [float(o) for o in module.input_offset],
        "input_channels": "rgb",
        "padding": getattr(module, "padding", None),
        "source": dict(source),
    }
    file_io.makedirs(output)
    host = jax.tree_util.tree_map(np.asarray, dict(variables))
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(file_io.join(output, CHECKPOINT_SUBDIR), host)
    file_io.write_json(file_io.join(output, METADATA_FILE), metadata)
    return metadata


def read_backbone_metadata(path: str) -> dict[str, Any]:
    """Returns the backbone.json of a checkpoint folder.

    Raises:
      ValueError: `path` has no backbone.json, or it lacks a key the
        converter records (named, with how to convert the weights again).
    """
    metadata_path = file_io.join(path, METADATA_FILE)
    if not file_io.isfile(metadata_path):
        raise ValueError(
            f"{path} is not a backbone checkpoint folder (no {METADATA_FILE}); "
            "create one with python -m landmark_jax.models.keras_import"
        )
    metadata = file_io.read_json(metadata_path)
    for key, may_be_null in _METADATA_KEYS.items():
        if key not in metadata or (metadata[key] is None and not may_be_null):
            raise ValueError(
                f"{metadata_path} does not record {key}, which the converter records for "
                "every backbone: it was written by an earlier version of landmark_jax. "
                "Convert the weights again into a new folder (python -m "
                "landmark_jax.models.keras_import --arch=... --weights=... --output=NEW)"
            )
    return metadata


def load_backbone(path: str, **overrides: Any) -> tuple[nn.Module, dict[str, Any]]:
    """Loads a backbone checkpoint with the module it was written for.

    Args:
      path: the converter's --output folder.
      **overrides: module attributes to change, e.g. dtype.

    Returns:
      (module with the recorded input normalisation and padding, variables
      as numpy arrays).

    Raises:
      ValueError: missing files, or variables that do not fit the arch (the
        message names each variable).
    """
    metadata = read_backbone_metadata(path)
    recorded: dict[str, Any] = {
        "input_scale": tuple(metadata["input_scale"]),
        "input_offset": tuple(metadata["input_offset"]),
    }
    if metadata["padding"] is not None:
        recorded["padding"] = metadata["padding"]
    module = backbones.create_backbone(metadata["arch"], **{**recorded, **overrides})
    return module, _restore_checked(path, module)


def load_backbone_checkpoint(path: str) -> dict[str, Any]:
    """Returns {'params', 'batch_stats'} (numpy) of a backbone checkpoint.

    The variables are checked name by name and shape by shape against the
    recorded arch before they are returned. The input normalisation they
    need is `read_backbone_metadata(path)['input_normalization']`, a preset
    name: 'imagenet' for keras.applications EfficientNet ImageNet weights
    (from weights='imagenet' or the released .h5 alike), 'caffe' for Keras
    ResNet, or what --input_normalization stated for other weights.

    Args:
      path: the converter's --output folder.

    Raises:
      ValueError: missing files, or variables that do not fit the arch.
    """
    return load_backbone(path)[1]


def _restore_checked(path: str, module: nn.Module) -> dict[str, Any]:
    checkpoint = file_io.join(file_io.checkpoint_path(path), CHECKPOINT_SUBDIR)
    if not file_io.isdir(checkpoint):
        raise ValueError(f"{path}: no {CHECKPOINT_SUBDIR}/ checkpoint")
    # Restored without a target (as saved: numpy), then compared by name.
    restored = ocp.StandardCheckpointer().restore(checkpoint)
    expected = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, 64, 64, 3)))
    got = flax.traverse_util.flatten_dict(restored, sep="/")
    want = flax.traverse_util.flatten_dict(flax.core.unfreeze(expected), sep="/")
    problems = [f"missing {k}" for k in sorted(set(want) - set(got))]
    problems += [f"unexpected {k}" for k in sorted(set(got) - set(want))]
    problems += [
        f"{k}: checkpoint {tuple(got[k].shape)} vs model {want[k].shape}"
        for k in sorted(set(want) & set(got))
        if tuple(got[k].shape) != want[k].shape
    ]
    if problems:
        raise ValueError(f"{path} does not fit {type(module).__name__}: {problems}")
    return {k: jax.tree_util.tree_map(np.asarray, v) for k, v in restored.items()}
