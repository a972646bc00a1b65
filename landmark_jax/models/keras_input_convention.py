"""The input convention of keras.applications weights, established from them.

`keras_import.from_keras` folds a Keras model's preprocessing layers into an
affine x*scale+offset on RGB pixels in [0, 255]. A converted checkpoint does
not record that affine but the preset of input_normalization.py the weights
need, established here from the affine and the architecture:

- EfficientNet: `imagenet`, (x/255 - mean)/std. The released Keras `.h5`
  files store the ImageNet std as the Normalization layer's *variance*, and
  keras.applications adds the compensating Rescaling(1/sqrt(std)) only when
  built with weights='imagenet' (tensorflow/tensorflow#49930). A model built
  from the same file given as a path therefore computes (x/255 - mean) /
  sqrt(std); both that and the weights='imagenet' affine are recognised as
  the `imagenet` convention and written as exactly that preset.
- ResNet: `caffe`. Its Keras weights expect caffe-style BGR (the model has no
  preprocessing layers), so keras_import reorders conv1's input channels to
  take RGB.

Any other affine is an error unless `--input_normalization=PRESET` states the
convention of the weights; a PRESET that contradicts an established one is an
error too.
"""

from collections.abc import Sequence

import flax.linen as nn
import numpy as np

from landmark_jax.models import input_normalization, resnet

# Affines folded from Keras layers hold float32 means/variances: equal to a
# preset up to that rounding (the presets differ from each other by far more).
_AFFINE_RTOL, _AFFINE_ATOL = 1e-5, 1e-6


def _same_affine(a: input_normalization.InputNormalization, b: Sequence) -> bool:
    return bool(
        np.allclose(a.scale, b[0], rtol=_AFFINE_RTOL, atol=_AFFINE_ATOL)
        and np.allclose(a.offset, b[1], rtol=_AFFINE_RTOL, atol=_AFFINE_ATOL)
    )


def _released_h5_affine() -> input_normalization.InputNormalization:
    """What Keras EfficientNet built from a released ImageNet .h5 path computes.

    The file's Normalization holds variance = ImageNet std, and without the
    Rescaling(1/sqrt(std)) that only weights='imagenet' adds, the model
    computes (x/255 - mean)/sqrt(std).
    """
    mean = np.asarray(input_normalization.IMAGENET_MEAN_RGB, np.float64)
    sqrt_std = np.sqrt(np.asarray(input_normalization.IMAGENET_STD_RGB, np.float64))
    return input_normalization.InputNormalization(
        tuple(float(s) for s in 1.0 / (255.0 * sqrt_std)),
        tuple(float(o) for o in -mean / sqrt_std),
    )


def _format_affine(scale: Sequence[float], offset: Sequence[float]) -> str:
    return (
        f"x*scale+offset with scale={[round(float(s), 6) for s in scale]}, "
        f"offset={[round(float(o), 6) for o in offset]}"
    )


def establish_input_normalization(module: nn.Module) -> tuple[str | None, str]:
    """The input convention of keras.applications weights, from the folded affine.

    Args:
      module: a backbone from `from_keras` on a keras.applications model
        built by its constructor (with weights='imagenet' or a file path).

    Returns:
      (preset name, or None where the convention cannot be established;
      why, in a few words, for messages and the recorded provenance).
    """
    affine = (module.input_scale, module.input_offset)
    if isinstance(module, resnet.ResNet):
        # keras.applications ResNets have no preprocessing layers; their
        # weights expect preprocess_input(mode='caffe') done by the caller.
        if _same_affine(input_normalization.INPUT_NORMALIZATIONS["none"], affine):
            return "caffe", "keras.applications ResNet: caffe-style BGR input"
        return None, "a Keras ResNet with preprocessing layers"
    if _same_affine(input_normalization.INPUT_NORMALIZATIONS["imagenet"], affine):
        return "imagenet", "the Keras model computes the imagenet preset"
    if _same_affine(_released_h5_affine(), affine):
        return "imagenet", (
            "released Keras EfficientNet .h5: the Normalization variance holds the "
            "ImageNet std, the model (x/255 - mean)/sqrt(std), the weights need "
            "(x/255 - mean)/std (tensorflow/tensorflow#49930)"
        )
    return None, "neither the imagenet preset nor the released Keras ImageNet .h5 layout"


def choose_input_normalization(
    arch: str, weights: str, module: nn.Module, requested: str | None
) -> tuple[str, str]:
    """The preset a converted checkpoint records, and how it was established.

    Args:
      arch: the --arch of the conversion (for messages).
      weights: the --weights of the conversion (for messages).
      module: the backbone from `from_keras`, its Keras input affine folded in.
      requested: the --input_normalization preset, or None.

    Returns:
      (preset name, how it was established): the established preset, or the
      requested one where none can be established.

    Raises:
      ValueError: an unknown requested preset, a convention that cannot be
        established without one, or a requested preset whose affine
        contradicts the established one.
    """
    if requested is not None:
        input_normalization.get_input_normalization(requested)  # an unknown name raises
    established, why = establish_input_normalization(module)
    found = _format_affine(module.input_scale, module.input_offset)
    valid = ", ".join(sorted(input_normalization.INPUT_NORMALIZATIONS))
    if established is None:
        if requested is None:
            raise ValueError(
                f"--weights={weights} (--arch={arch}): the Keras model's preprocessing "
                f"computes {found}, {why}, so the input normalisation these weights need "
                "cannot be established; pass --input_normalization=PRESET with the "
                f"normalisation they were trained with (one of: {valid})"
            )
        return requested, "--input_normalization"
    if requested is not None and not _same_affine(
        input_normalization.INPUT_NORMALIZATIONS[requested],
        input_normalization.INPUT_NORMALIZATIONS[established],
    ):
        raise ValueError(
            f"--input_normalization={requested} contradicts the {established!r} "
            f"normalisation established from --weights={weights} (--arch={arch}; {why}; "
            f"the Keras model's preprocessing computes {found}); drop the flag or pass "
            f"--input_normalization={established}"
        )
    return established, why
