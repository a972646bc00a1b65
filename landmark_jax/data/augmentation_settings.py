"""The settings of the training augmentations, checked: `config.input` read.

train_augmentation.py applies them as tf.data ops (GLR2021's released
transforms: a JPEG re-encode, ShiftScaleRotate, Cutout, the flip). The
settings live apart from the ops so that checking a config
(config_lib.validate_config: the train program before anything runs, the TPU
job's dry run on a workstation) needs no TensorFlow.
"""

from __future__ import annotations

import dataclasses

import ml_collections


@dataclasses.dataclass(frozen=True)
class Augmentation:
    """What the training stream does to each image besides resizing it.

    Attributes:
      flip: left-right flip with p = 0.5.
      jpeg_prob: probability of a JPEG re-encode.
      jpeg_quality: (lowest, highest) quality, both included.
      warp_prob: probability of ShiftScaleRotate.
      warp_shift: shift limit t, as a fraction of the image's side.
      warp_scale: scale limit s: the zoom is drawn from U(1 - s, 1 + s).
      warp_rotate: rotation limit in degrees.
      cutout_prob: probability of one black square hole.
      cutout_size: the hole's side as a fraction of the resized square.
    """

    flip: bool = True
    jpeg_prob: float = 0.0
    jpeg_quality: tuple[int, int] = (99, 100)
    warp_prob: float = 0.0
    warp_shift: float = 0.2
    warp_scale: float = 0.2
    warp_rotate: float = 10.0
    cutout_prob: float = 0.0
    cutout_size: float = 0.4

    def __post_init__(self):
        problems = []
        for name in ("jpeg_prob", "warp_prob", "cutout_prob"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                problems.append(f"{_KEYS[name]}={value!r}: expected a probability in [0, 1]")
        lo, hi = self.jpeg_quality
        if not 1 <= lo <= hi <= 100:
            problems.append(
                f"{_KEYS['jpeg_quality']}={self.jpeg_quality!r}: "
                "expected (lo, hi) with 1 <= lo <= hi <= 100"
            )
        for name, low, high in (
            ("warp_shift", 0.0, 1.0),
            ("warp_scale", 0.0, 0.99),
            ("warp_rotate", 0.0, 180.0),
            ("cutout_size", 0.0, 1.0),
        ):
            value = getattr(self, name)
            if not low <= value <= high:
                problems.append(f"{_KEYS[name]}={value!r}: expected a value in [{low}, {high}]")
        if problems:
            raise ValueError("; ".join(problems))


# The config key of each field, for error messages.
_KEYS = {
    "jpeg_prob": "config.input.jpeg.prob",
    "jpeg_quality": "config.input.jpeg.quality",
    "warp_prob": "config.input.shift_scale_rotate.prob",
    "warp_shift": "config.input.shift_scale_rotate.shift",
    "warp_scale": "config.input.shift_scale_rotate.scale",
    "warp_rotate": "config.input.shift_scale_rotate.rotate",
    "cutout_prob": "config.input.cutout.prob",
    "cutout_size": "config.input.cutout.size",
}


def from_config(input_config: ml_collections.ConfigDict) -> Augmentation:
    """The augmentation a config's `input` block asks for.

    Args:
      input_config: `config.input` (base_config's keys: flip, jpeg,
        shift_scale_rotate, cutout).

    Returns:
      The Augmentation.

    Raises:
      ValueError: a value out of range; the message names the key.
    """
    jpeg, warp, cutout = input_config.jpeg, input_config.shift_scale_rotate, input_config.cutout
    return Augmentation(
        flip=bool(input_config.flip),
        jpeg_prob=float(jpeg.prob),
        jpeg_quality=tuple(int(q) for q in jpeg.quality),
        warp_prob=float(warp.prob),
        warp_shift=float(warp.shift),
        warp_scale=float(warp.scale),
        warp_rotate=float(warp.rotate),
        cutout_prob=float(cutout.prob),
        cutout_size=float(cutout.size),
    )
