"""Import keras.applications weights into the Flax backbones.

    from_keras(keras_model) -> (module, variables)

reproduces `keras_model(x)` with `module.apply(variables, x)` for Keras
EfficientNetB0..B7 and ResNet50/101 built with `include_top=False` (and
`pooling=None`), preprocessing layers included. The architecture is read off
the model's layers and weight shapes, never its name.

The command line converts a weights file (or `imagenet`, downloaded by Keras
where there is internet) into an Orbax checkpoint:

    python -m landmark_jax.models.keras_import --arch=efficientnet_b7 \
        --weights=PATH.h5|imagenet --output=DIR [--input_normalization=PRESET]

DIR's layout is described in backbone_checkpoint.py. Every checkpoint takes
RGB pixels in [0, 255] and records the input normalisation its weights need
as a preset of input_normalization.py, established from the weights as
keras_input_convention.py describes. `backbone_checkpoint.load_backbone_checkpoint(DIR)`
returns the variables, `backbone_checkpoint.load_backbone(DIR)` the module as well.
"""

import functools
import json
import os
import sys
import tempfile
from collections.abc import Mapping, Sequence
from typing import Any

import flax
import flax.linen as nn
import h5py
import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from landmark_jax.models import (
    backbone_checkpoint,
    backbones,
    input_normalization,
    keras_architecture,
    keras_input_convention,
    resnet,
)
from landmark_jax.runtime import entry_point_errors, file_io, tensorflow_setup

_BN_VARIABLES = {"scale": "gamma", "bias": "beta", "mean": "moving_mean", "var": "moving_variance"}
# keras.backend.epsilon(), the floor of Normalization's sqrt(variance).
_KERAS_EPSILON = 1e-7

# ----------------------------------------------------------------------------
# Conversion.


def _input_affine(keras_model: Any, consumed: set[str]) -> tuple[np.ndarray, np.ndarray]:
    """Folds the preprocessing layers before the first conv into x*scale+offset."""
    scale, offset = np.ones(3, np.float64), np.zeros(3, np.float64)
    for layer in keras_model.layers:
        kind = type(layer).__name__
        if kind in ("InputLayer", "ZeroPadding2D"):
            continue
        if kind == "Rescaling":
            factor = np.broadcast_to(np.asarray(layer.scale, np.float64), (3,))
            shift = np.broadcast_to(np.asarray(layer.offset, np.float64), (3,))
            scale, offset = scale * factor, offset * factor + shift
        elif kind == "Normalization":
            if tuple(layer.axis) not in ((-1,), (3,)):
                raise ValueError(f"{layer.name}: only channel-axis Normalization is supported")
            # The tensors `call` uses, which may differ from the variables
            # until finalize_state(); parity is with what Keras computes.
            mean = np.broadcast_to(np.asarray(layer.mean, np.float64).reshape(-1), (3,))
            var = np.broadcast_to(np.asarray(layer.variance, np.float64).reshape(-1), (3,))
            std = np.maximum(np.sqrt(var), _KERAS_EPSILON)
            if layer.invert:
                scale, offset = scale * std, offset * std + mean
            else:
                scale, offset = scale / std, (offset - mean) / std
            consumed.update(f"{layer.name}/{w.name}" for w in layer.weights)
        elif layer.weights:
            return scale, offset  # the first conv: preprocessing is over
        else:
            raise ValueError(
                f"unsupported layer {layer.name!r} ({kind}) before the first conv of "
                f"{keras_model.name!r}"
            )
    raise ValueError(f"Keras model {keras_model.name!r} has no weighted layer")


def _keras_weights(keras_model: Any) -> dict[str, np.ndarray]:
    weights = {}
    for layer in keras_model.layers:
        for variable, value in zip(layer.weights, layer.get_weights(), strict=True):
            weights[f"{layer.name}/{variable.name}"] = np.asarray(value)
    return weights


# Small: a process converts a handful of architectures, and each entry is
# shapes only (a few hundred ShapeDtypeStructs).
@functools.lru_cache(maxsize=8)
def _abstract_variables(module: nn.Module) -> dict[tuple[str, ...], jax.ShapeDtypeStruct]:
    """The module's variables as {path: ShapeDtypeStruct}, flattened.

    Cached by the module (a frozen, hashable dataclass: equal attributes,
    equal key) because tracing `module.init` costs about a second for an
    EfficientNet and every conversion of the same architecture and input
    affine (several in one process: a notebook, the tests) traces the same
    program. Callers must not mutate the returned mapping.
    """
    abstract = jax.eval_shape(
        module.init, jax.random.key(0), jnp.zeros((1, 64, 64, 3), jnp.float32)
    )
    return flax.traverse_util.flatten_dict(flax.core.unfreeze(abstract))


def _fill_variables(
    module: nn.Module, keras_weights: Mapping[str, np.ndarray], consumed: set[str]
) -> dict[str, Any]:
    """Maps each Flax variable to its Keras weight by name; errors list leftovers."""
    flat = _abstract_variables(module)
    missing, mismatched, filled = [], [], {}
    for path, leaf in flat.items():
        modules, variable = path[1:-1], path[-1]
        layer = "_".join(modules)
        keras_name = _BN_VARIABLES[variable] if modules[-1].endswith("bn") else variable
        key = f"{layer}/{keras_name}"
        if key not in keras_weights:
            missing.append(f"{'/'.join(path)} (Keras {key})")
            continue
        value = keras_weights[key]
        if key in consumed:
            raise ValueError(f"Keras weight {key} would be used twice")
        consumed.add(key)
        if value.ndim == 4 and value.shape[-1] == 1 and leaf.shape[-2] == 1:
            value = value.transpose(0, 1, 3, 2)  # depthwise [k,k,C,1] -> [k,k,1,C]
        if value.shape != leaf.shape:
            mismatched.append(f"{'/'.join(path)}: Flax {leaf.shape} vs Keras {key} {value.shape}")
            continue
        filled[path] = value.astype(leaf.dtype)
    unexpected = sorted(set(keras_weights) - consumed)
    if missing or unexpected or mismatched:
        raise ValueError(
            f"Keras weights do not fit {type(module).__name__}:\n"
            f"  missing (Flax variables without a Keras weight): {missing}\n"
            f"  unexpected (Keras weights not used): {unexpected}\n"
            f"  shape mismatches: {mismatched}"
        )
    return flax.traverse_util.unflatten_dict(filled)


def from_keras(keras_model: Any) -> tuple[nn.Module, dict[str, Any]]:
    """Converts a keras.applications backbone to Flax.

    `module.apply(variables, x)['final']` equals `keras_model(x)` for the
    same input (the Keras model's own convention, its preprocessing layers
    folded into the module's input_scale/input_offset), to float32 rounding.

    Args:
      keras_model: Keras EfficientNetB0..B7 or ResNet50/101, built with
        include_top=False and pooling=None.

    Returns:
      (module, variables): the Flax backbone and {'params', 'batch_stats'}
      as numpy float32 arrays.

    Raises:
      ValueError: unsupported architecture, a head, or weights that do not
        map one-to-one (the message lists missing/unexpected names).
    """
    name = keras_architecture.detect_architecture(keras_model)
    consumed: set[str] = set()
    scale, offset = _input_affine(keras_model, consumed)
    overrides: dict[str, Any] = {
        "input_scale": tuple(float(s) for s in scale),
        "input_offset": tuple(float(o) for o in offset),
    }
    if name.startswith("efficientnet"):
        # Keras fixes its stride-2 padding when the input size is unknown.
        height = keras_model.input_shape[1]
        overrides["padding"] = "keras_dynamic" if height is None else "same"
    module = backbones.create_backbone(name, **overrides)
    variables = _fill_variables(module, _keras_weights(keras_model), consumed)
    return module, variables


def caffe_bgr_to_rgb(module: nn.Module, variables: dict[str, Any]) -> tuple[nn.Module, dict]:
    """Makes a from_keras ResNet take RGB [0, 255] pixels with the caffe preset.

    Keras ResNet weights expect `preprocess_input(x, mode='caffe')`: BGR
    order minus the BGR mean. Reversing conv1's input channels and
    subtracting the RGB mean in the module gives the same function of RGB.

    Args:
      module: a ResNet from `from_keras` (identity input normalisation).
      variables: its variables.

    Returns:
      (module with the 'caffe' normalisation, variables with conv1 reordered).
    """
    preset = input_normalization.INPUT_NORMALIZATIONS["caffe"]
    params = dict(variables["params"])
    conv1 = dict(params["conv1_conv"])
    conv1["kernel"] = np.ascontiguousarray(np.asarray(conv1["kernel"])[:, :, ::-1, :])
    params["conv1_conv"] = conv1
    module = module.clone(input_scale=preset.scale, input_offset=preset.offset)
    return module, {**variables, "params": params}


# ----------------------------------------------------------------------------
# Weights files and the command line.


def _h5_layer_shapes(path: str) -> dict[str, list[tuple[int, ...]]]:
    """Layer name -> weight shapes, from a legacy .h5 or a Keras 3 .weights.h5."""
    shapes: dict[str, list[tuple[int, ...]]] = {}
    with h5py.File(path, "r") as f:
        root = f["model_weights"] if "layer_names" not in f.attrs and "model_weights" in f else f
        if "layer_names" in root.attrs:  # Keras 2 format, the applications' files
            for raw in root.attrs["layer_names"]:
                name = raw.decode() if isinstance(raw, bytes) else str(raw)
                group = root[name]
                weight_names = [
                    w.decode() if isinstance(w, bytes) else str(w)
                    for w in group.attrs.get("weight_names", [])
                ]
                if weight_names:
                    shapes[name] = [tuple(group[w].shape) for w in weight_names]
            return shapes

        def visit(_: str, obj: Any) -> None:
            # Keras 3: <object path>/vars/{0,1,...}, the layer name in attrs.
            if isinstance(obj, h5py.Group) and obj.name.endswith("/vars") and len(obj):
                name = obj.attrs.get("name")
                keys = sorted(obj, key=lambda k: int(k) if k.isdigit() else k)
                if name is not None:
                    shapes[str(name)] = [tuple(obj[k].shape) for k in keys]

        f.visititems(visit)
    return shapes


def _check_weights_file(path: str, arch: str) -> None:
    if not os.path.isfile(path):
        raise ValueError(f"--weights={path}: no such file")
    try:
        shapes = _h5_layer_shapes(path)
    except OSError as e:
        raise ValueError(f"--weights={path}: not a readable HDF5 weights file ({e})") from e
    if "predictions" in shapes:
        raise ValueError(
            f"--weights={path} includes the classification top ('predictions'); "
            "use the include_top=False (*_notop.h5) weights"
        )
    found, signature = keras_architecture.identify(shapes)
    # Keras loads legacy .h5 files by layer order, not name: a file whose
    # names we do not recognise may still load, so only a positive
    # identification of something else is an error here.
    if signature is not None and found != arch:
        what = found if found else keras_architecture.describe(signature)
        raise ValueError(f"--weights={path} holds weights for {what}, not --arch={arch}")


def _build_keras_model(arch: str, weights: str) -> Any:
    if arch not in keras_architecture.KERAS_APPLICATIONS:
        raise ValueError(
            f"--arch={arch} unsupported; valid: {', '.join(keras_architecture.KERAS_APPLICATIONS)}"
        )
    if weights != "imagenet" and file_io.is_url(weights):
        # h5py and Keras read local files only: a bucket's file is copied to a
        # temporary one, removed once the model holds the weights.
        if not file_io.isfile(weights):
            raise ValueError(f"--weights={weights}: no such file")
        with tempfile.TemporaryDirectory() as scratch:
            local = os.path.join(scratch, file_io.basename(weights))
            with open(local, "wb") as f:
                f.write(file_io.read_bytes(weights))
            return _build_keras_model(arch, local)
    if weights != "imagenet":
        _check_weights_file(weights, arch)
    # Deferred, and after the checks above: only the conversion itself needs
    # Keras, and a refused --arch or --weights is reported without it.
    import keras

    constructor = getattr(keras.applications, keras_architecture.KERAS_APPLICATIONS[arch])
    try:
        return constructor(include_top=False, weights=weights)
    except Exception as e:  # Keras's loader errors rarely name the file
        raise ValueError(
            f"could not load --weights={weights} into keras.applications."
            f"{keras_architecture.KERAS_APPLICATIONS[arch]}(include_top=False): {e}"
        ) from e


def convert(
    arch: str, weights: str, output: str, input_normalization: str | None = None
) -> dict[str, Any]:
    """Builds the Keras model, converts it and writes the checkpoint.

    The checkpoint records the input normalisation the weights need, a
    preset name (never null): established from the Keras model for
    keras.applications weights (see keras_input_convention.py), otherwise the
    one the caller states.

    Args:
      arch: a key of `keras_architecture.KERAS_APPLICATIONS`.
      weights: a .h5 / .weights.h5 path, or 'imagenet' (needs internet).
      output: the output folder; must not hold a checkpoint already.
      input_normalization: a preset of input_normalization.py stating the
        convention of the weights; needed when it cannot be established
        from them, and checked against it when it can.

    Returns:
      The metadata written to `output/backbone.json`.

    Raises:
      ValueError: unknown arch or preset, a weights file for another
        architecture, an existing checkpoint in `output`, a convention that
        cannot be established without `input_normalization`, or an
        `input_normalization` that contradicts the established one.
    """
    backbone_checkpoint.check_output_is_new(output)
    if input_normalization is not None:
        _preset(input_normalization)  # unknown: raises before Keras builds (or downloads)
    keras_model = _build_keras_model(arch, weights)
    module, variables = from_keras(keras_model)
    keras_affine = {
        "scale": [float(s) for s in module.input_scale],
        "offset": [float(o) for o in module.input_offset],
    }
    preset_name, established_by = keras_input_convention.choose_input_normalization(
        arch, weights, module, input_normalization
    )
    if isinstance(module, resnet.ResNet) and preset_name == "caffe":
        module, variables = caffe_bgr_to_rgb(module, variables)
    else:
        module = _with_preset(module, preset_name)
    return backbone_checkpoint.save_backbone_checkpoint(
        output,
        arch,
        module,
        variables,
        source={
            "weights": weights,
            "keras_class": keras_architecture.KERAS_APPLICATIONS[arch],
            # What the Keras model itself computed, and why the recorded
            # normalisation differs from it where it does.
            "keras_input_affine": keras_affine,
            "input_normalization_from": established_by,
        },
        input_normalization_name=preset_name,
    )


def _preset(name: str) -> input_normalization.InputNormalization:
    """The preset `name` (ValueError naming the valid ones if unknown)."""
    return input_normalization.get_input_normalization(name)


def _with_preset(module: nn.Module, name: str) -> nn.Module:
    preset = _preset(name)
    return module.clone(input_scale=preset.scale, input_offset=preset.offset)


FLAGS = flags.FLAGS


def define_flags() -> None:
    """Defines the command-line flags (only when run as a program: absl flags are
    global, and importing two tools into one process must not collide)."""
    flags.DEFINE_enum(
        "arch", None, sorted(keras_architecture.KERAS_APPLICATIONS), "Backbone architecture."
    )
    flags.DEFINE_string("weights", None, "PATH.h5 or 'imagenet'.")
    flags.DEFINE_string("output", None, "Output folder (an Orbax checkpoint).")
    flags.DEFINE_enum(
        "input_normalization",
        None,
        sorted(input_normalization.INPUT_NORMALIZATIONS),
        "The input normalisation the weights were trained with; required only when it "
        "cannot be established from them (keras.applications ImageNet weights need "
        "none), an error if it contradicts them.",
    )
    flags.mark_flags_as_required(["arch", "weights", "output"])


def main(argv: Sequence[str]) -> int:
    """Converts --weights; a ValueError (e.g. weights of another architecture)
    is printed as one line and exits with status 2, not a traceback."""
    entry_point_errors.refuse_arguments(argv)
    tensorflow_setup.hide_accelerators()  # Keras's TensorFlow leaves them to JAX
    try:
        metadata = convert(FLAGS.arch, FLAGS.weights, FLAGS.output, FLAGS.input_normalization)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(json.dumps(metadata, indent=2))
    return 0


if __name__ == "__main__":
    define_flags()
    entry_point_errors.run(main)
