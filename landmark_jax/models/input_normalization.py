"""Per-channel input normalisation of the backbones: presets and the op itself.

The input pipeline hands the model raw pixels in [0, 255] (RGB, uint8 or
float); the first op of every backbone is `x * scale + offset` per channel.
Which affine is right depends on the weights: ImageNet weights are only
useful with the normalisation they were trained with. Presets, by name:

- `imagenet`: (x / 255 - mean) / std with the usual ImageNet RGB mean/std.
  The default of every backbone, for training from scratch.
- `keras_efficientnet_imagenet`: what `keras.applications.EfficientNetB*`
  with `weights='imagenet'` computes in its own preprocessing layers:
  Rescaling(1/255), Normalization(mean, variance=std) (the Keras weights file
  stores the ImageNet std as the "variance", tensorflow/tensorflow#49930) and
  Rescaling(1/sqrt(std)). The two std factors multiply out, so this is the
  `imagenet` preset up to float rounding (and `match_input_normalization`
  reports it as `imagenet`). Matches checkpoints converted from Keras
  EfficientNet ImageNet weights.
- `caffe`: x - mean_rgb, no scaling: Keras ResNet50/101 ImageNet weights,
  which expect caffe-style BGR input. The converter CLI reorders conv1's input
  channels so that its checkpoints take RGB like every other backbone, and
  this preset then matches them.
- `none`: identity. `from_keras` on a Keras ResNet gives this (the Keras model
  expects the caller to have preprocessed already).
"""

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

IMAGENET_MEAN_RGB = (0.485, 0.456, 0.406)
IMAGENET_STD_RGB = (0.229, 0.224, 0.225)
# keras.applications.imagenet_utils "caffe" mode, given here in RGB order.
CAFFE_MEAN_RGB = (123.68, 116.779, 103.939)


class InputNormalization(NamedTuple):
    """Per-channel affine `x * scale + offset` applied to [0, 255] pixels."""

    scale: tuple[float, float, float]
    offset: tuple[float, float, float]


def _from_mean_std(
    mean: tuple[float, ...], std: tuple[float, ...], pixel_scale: float
) -> InputNormalization:
    scale = tuple(pixel_scale / s for s in std)
    offset = tuple(-m / s for m, s in zip(mean, std, strict=True))
    return InputNormalization(scale, offset)


def _keras_efficientnet_imagenet() -> InputNormalization:
    # Spelled out as the Keras layer chain so the preset visibly is that chain.
    extra = tuple(1.0 / math.sqrt(s) for s in IMAGENET_STD_RGB)
    sqrt_var = tuple(math.sqrt(s) for s in IMAGENET_STD_RGB)
    scale = tuple(e / (255.0 * v) for e, v in zip(extra, sqrt_var, strict=True))
    offset = tuple(-m * e / v for m, e, v in zip(IMAGENET_MEAN_RGB, extra, sqrt_var, strict=True))
    return InputNormalization(scale, offset)


INPUT_NORMALIZATIONS: dict[str, InputNormalization] = {
    "imagenet": _from_mean_std(IMAGENET_MEAN_RGB, IMAGENET_STD_RGB, 1.0 / 255.0),
    "keras_efficientnet_imagenet": _keras_efficientnet_imagenet(),
    "caffe": InputNormalization((1.0, 1.0, 1.0), tuple(-m for m in CAFFE_MEAN_RGB)),
    "none": InputNormalization((1.0, 1.0, 1.0), (0.0, 0.0, 0.0)),
}

IMAGENET_SCALE = INPUT_NORMALIZATIONS["imagenet"].scale
IMAGENET_OFFSET = INPUT_NORMALIZATIONS["imagenet"].offset


def get_input_normalization(name: str) -> InputNormalization:
    """Returns the preset called `name`.

    Args:
      name: a key of `INPUT_NORMALIZATIONS`.

    Returns:
      The preset's (scale, offset).

    Raises:
      ValueError: on an unknown name; the message lists the valid ones.
    """
    if name not in INPUT_NORMALIZATIONS:
        raise ValueError(
            f"unknown input normalization {name!r}; valid: "
            f"{', '.join(sorted(INPUT_NORMALIZATIONS))}"
        )
    return INPUT_NORMALIZATIONS[name]


def match_input_normalization(
    scale: tuple[float, ...], offset: tuple[float, ...], rtol: float = 1e-5
) -> str | None:
    """Returns the name of the first preset equal to (scale, offset), or None."""
    for name, preset in INPUT_NORMALIZATIONS.items():
        if np.allclose(scale, preset.scale, rtol=rtol, atol=1e-7) and np.allclose(
            offset, preset.offset, rtol=rtol, atol=1e-7
        ):
            return name
    return None


def normalize_pixels(
    x: jax.Array,
    scale: tuple[float, ...],
    offset: tuple[float, ...],
    dtype: jnp.dtype,
) -> jax.Array:
    """Applies `x * scale + offset` per channel and casts to `dtype`.

    The affine runs in float32 whatever `dtype` is: bf16 holds the integers
    0..255 exactly but not their normalised values' sums with the offset.

    Args:
      x: [..., 3] pixels, uint8 or float.
      scale: 3 per-channel factors.
      offset: 3 per-channel offsets.
      dtype: the computation dtype of the backbone.

    Returns:
      The normalised array in `dtype`.
    """
    x = jnp.asarray(x, jnp.float32)
    x = x * jnp.asarray(scale, jnp.float32) + jnp.asarray(offset, jnp.float32)
    return x.astype(dtype)
