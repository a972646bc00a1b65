"""Training augmentations of GLR2021's released code, as tf.data ops.

The GLR2021 winners (Henkel et al., `configs/cfg_ch_dolg_*.py`, albumentations
1.0.0) augment every training image with

    HorizontalFlip(p=0.5)
    ImageCompression(quality_lower=99, quality_upper=100)        # p=0.5 (default)
    ShiftScaleRotate(shift_limit=0.2, scale_limit=0.2, rotate_limit=10,
                     border_mode=0, p=0.7)
    Resize(S, S)
    Cutout(max_h_size=int(0.4 S), max_w_size=int(0.4 S), num_holes=1, p=0.5)

applied in that order to the decoded image (JPEG and ShiftScaleRotate at the
image's own resolution, Cutout on the resized square). This module
reproduces each transform's definition in albumentations 1.0.0:

- ImageCompression: a JPEG re-encode at a quality drawn uniformly from the
  integers [lo, hi] (both included).
- ShiftScaleRotate: angle ~ U(-r, r) degrees (counter-clockwise), scale ~
  U(1 - s, 1 + s), dx, dy ~ U(-t, t); the forward map is OpenCV's
  getRotationMatrix2D((w/2, h/2), angle, scale) with (dx w, dy h) added to its
  translation; bilinear sampling, zero outside the image (border_mode=0 is
  cv2.BORDER_CONSTANT).
- Cutout: one hole of exactly `int(size S)` pixels each way, its centre
  (y, x) drawn from the integers [0, S] inclusive; y1 = clip(y - h // 2, 0,
  S), y2 = clip(y1 + h, 0, S) (likewise x), filled with 0 (black, before
  normalisation).

The flip, which commutes with the resize, stays after it as before (see
input_pipeline), so it follows rather than precedes the JPEG and the warp; the
ranges of both are symmetric, so the distribution of augmented images is the
same. Every draw comes from a stateless RNG keyed by (seed, the example's
position in the stream), one stream per transform, so augmentation is
reproduced exactly on resume. The transforms' settings and their checks are
augmentation_settings.py's.
"""

from __future__ import annotations

import math

import tensorflow as tf

# What the stream does to each image (its settings and their checks are
# TensorFlow-free, for the config checks: config_lib.validate_config).
from landmark_jax.data.augmentation_settings import Augmentation

# Sub-streams of the per-example key; the flip keeps the key itself, as it
# did before the other transforms existed.
_JPEG_STREAM, _WARP_STREAM, _CUTOUT_STREAM = 1, 2, 3


def shift_scale_rotate_matrix(height, width, angle_degrees, scale, dx, dy) -> tf.Tensor:
    """The forward 3x3 map of ShiftScaleRotate, source pixel -> output pixel.

    OpenCV's getRotationMatrix2D(centre=(w/2, h/2), angle, scale): with
    a = scale cos(angle), b = scale sin(angle),
    [[a, b, (1 - a) cx - b cy], [-b, a, b cx + (1 - a) cy]], then (dx w, dy h)
    added to the translation. Pixel centres are at integer coordinates.

    Returns:
      float32 [3, 3].
    """
    h = tf.cast(height, tf.float32)
    w = tf.cast(width, tf.float32)
    theta = tf.cast(angle_degrees, tf.float32) * (math.pi / 180.0)
    a = tf.cast(scale, tf.float32) * tf.cos(theta)
    b = tf.cast(scale, tf.float32) * tf.sin(theta)
    cx, cy = w / 2.0, h / 2.0
    tx = (1.0 - a) * cx - b * cy + tf.cast(dx, tf.float32) * w
    ty = b * cx + (1.0 - a) * cy + tf.cast(dy, tf.float32) * h
    return tf.stack([[a, b, tx], [-b, a, ty], [0.0, 0.0, 1.0]])


def shift_scale_rotate(image, angle_degrees, scale, dx, dy):
    """Warps an image by ShiftScaleRotate with given parameters.

    Args:
      image: [H, W, C] uint8 or float.
      angle_degrees: counter-clockwise rotation.
      scale: zoom factor (1: none).
      dx, dy: shifts as fractions of the width and height.

    Returns:
      float32 [H, W, C]: bilinear samples, 0 where the source is outside.
    """
    shape = tf.shape(image)
    forward = shift_scale_rotate_matrix(shape[0], shape[1], angle_degrees, scale, dx, dy)
    # The op maps each output pixel to the input pixel it samples: the inverse.
    inverse = tf.linalg.inv(forward)
    inverse = inverse / inverse[2, 2]
    transform = tf.reshape(inverse, [9])[:8]
    return tf.raw_ops.ImageProjectiveTransformV3(
        images=tf.cast(image, tf.float32)[None],
        transforms=transform[None],
        output_shape=shape[:2],
        fill_value=0.0,
        interpolation="BILINEAR",
        fill_mode="CONSTANT",
    )[0]


def cutout_box(size, hole, centre_y, centre_x):
    """(y1, y2, x1, x2) of albumentations 1.0.0's Cutout hole on a size x size image."""
    y1 = tf.clip_by_value(centre_y - hole // 2, 0, size)
    y2 = tf.clip_by_value(y1 + hole, 0, size)
    x1 = tf.clip_by_value(centre_x - hole // 2, 0, size)
    x2 = tf.clip_by_value(x1 + hole, 0, size)
    return y1, y2, x1, x2


def cutout(image, y1, y2, x1, x2):
    """`image` [S, S, C] with rows y1:y2, columns x1:x2 set to 0."""
    rows = tf.range(tf.shape(image)[0])
    cols = tf.range(tf.shape(image)[1])
    inside_rows = (rows >= y1) & (rows < y2)
    inside_cols = (cols >= x1) & (cols < x2)
    hole = inside_rows[:, None] & inside_cols[None, :]
    return tf.where(hole[:, :, None], tf.zeros_like(image), image)


def _uniform(key, stream: int, index: int, minval=0.0, maxval=1.0, dtype=tf.float32):
    seed = tf.random.experimental.stateless_fold_in(
        tf.random.experimental.stateless_fold_in(key, stream), index
    )
    return tf.random.stateless_uniform([], seed=seed, minval=minval, maxval=maxval, dtype=dtype)


def augment_decoded(image, key, augmentation: Augmentation):
    """The transforms before the resize: JPEG re-encode and ShiftScaleRotate.

    Args:
      image: the decoded uint8 [H, W, 3].
      key: int64 [2], the example's stateless RNG key (seed, position).
      augmentation: what to apply.

    Returns:
      float32 [H, W, 3] (uint8 [H, W, 3] when neither transform is enabled).
    """
    if augmentation.jpeg_prob > 0:
        lo, hi = augmentation.jpeg_quality
        quality = _uniform(key, _JPEG_STREAM, 1, lo, hi + 1, tf.int32)
        image = tf.cond(
            _uniform(key, _JPEG_STREAM, 0) < augmentation.jpeg_prob,
            lambda: tf.image.adjust_jpeg_quality(image, quality),
            lambda: image,
        )
    if augmentation.warp_prob > 0:
        a = augmentation
        angle = _uniform(key, _WARP_STREAM, 1, -a.warp_rotate, a.warp_rotate)
        scale = _uniform(key, _WARP_STREAM, 2, 1.0 - a.warp_scale, 1.0 + a.warp_scale)
        dx = _uniform(key, _WARP_STREAM, 3, -a.warp_shift, a.warp_shift)
        dy = _uniform(key, _WARP_STREAM, 4, -a.warp_shift, a.warp_shift)
        image = tf.cast(image, tf.float32)
        image = tf.cond(
            _uniform(key, _WARP_STREAM, 0) < augmentation.warp_prob,
            lambda: shift_scale_rotate(image, angle, scale, dx, dy),
            lambda: image,
        )
    return image


def augment_resized(image, key, augmentation: Augmentation):
    """The transforms after the resize: Cutout.

    Args:
      image: float32 [S, S, 3], the resized image.
      key: the example's RNG key, as for augment_decoded.
      augmentation: what to apply.

    Returns:
      float32 [S, S, 3].
    """
    if augmentation.cutout_prob > 0:
        size = tf.shape(image)[0]
        hole = tf.cast(
            tf.math.floor(augmentation.cutout_size * tf.cast(size, tf.float32)), tf.int32
        )
        centre_y = _uniform(key, _CUTOUT_STREAM, 1, 0, size + 1, tf.int32)
        centre_x = _uniform(key, _CUTOUT_STREAM, 2, 0, size + 1, tf.int32)
        box = cutout_box(size, hole, centre_y, centre_x)
        image = tf.cond(
            _uniform(key, _CUTOUT_STREAM, 0) < augmentation.cutout_prob,
            lambda: cutout(image, *box),
            lambda: image,
        )
    return image
