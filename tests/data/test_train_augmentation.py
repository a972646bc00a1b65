"""GLR2021's training augmentations against their published definitions.

References are written here in numpy from the albumentations 1.0.0 / OpenCV
definitions (getRotationMatrix2D, warpAffine with BORDER_CONSTANT 0 and
bilinear sampling; Cutout's hole placement), not from the module under test.
"""

import io
import math

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from landmark_jax import config_lib
from landmark_jax.data import augmentation_settings, train_augmentation
from landmark_jax.data.augmentation_settings import Augmentation


def _cv2_rotation_matrix(cx, cy, angle_degrees, scale):
    """OpenCV's documented getRotationMatrix2D."""
    a = scale * math.cos(math.radians(angle_degrees))
    b = scale * math.sin(math.radians(angle_degrees))
    return np.array([[a, b, (1 - a) * cx - b * cy], [-b, a, b * cx + (1 - a) * cy]])


def _warp_affine_reference(image, matrix):
    """cv2.warpAffine(image, matrix, (w, h), INTER_LINEAR, BORDER_CONSTANT, 0), exact bilinear."""
    h, w, c = image.shape
    forward = np.vstack([matrix, [0, 0, 1]])
    inverse = np.linalg.inv(forward)
    padded = np.zeros((h + 2, w + 2, c))
    padded[1:-1, 1:-1] = image
    out = np.zeros((h, w, c))
    for y in range(h):
        for x in range(w):
            sx, sy, _ = inverse @ [x, y, 1]
            x0, y0 = math.floor(sx), math.floor(sy)
            fx, fy = sx - x0, sy - y0
            value = np.zeros(c)
            for dy, wy in ((0, 1 - fy), (1, fy)):
                for dx, wx in ((0, 1 - fx), (1, fx)):
                    yy, xx = y0 + dy, x0 + dx
                    if 0 <= yy < h and 0 <= xx < w and wx * wy > 0:
                        value += wx * wy * padded[yy + 1, xx + 1]
            out[y, x] = value
    return out


@pytest.mark.parametrize(
    "angle, scale, dx, dy",
    [(0.0, 1.0, 0.0, 0.0), (7.5, 1.13, 0.1, -0.15), (-10.0, 0.8, -0.2, 0.2), (3.0, 1.2, 0.0, 0.05)],
)
def test_shift_scale_rotate_matches_opencv_definition(angle, scale, dx, dy):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(13, 19, 3)).astype(np.uint8)
    got = train_augmentation.shift_scale_rotate(image, angle, scale, dx, dy).numpy()
    h, w = image.shape[:2]
    matrix = _cv2_rotation_matrix(w / 2, h / 2, angle, scale)
    matrix[0, 2] += dx * w
    matrix[1, 2] += dy * h
    want = _warp_affine_reference(image.astype(np.float64), matrix)
    np.testing.assert_allclose(got, want, atol=0.05)
    if (angle, scale, dx, dy) == (0.0, 1.0, 0.0, 0.0):
        np.testing.assert_array_equal(got, image)


def test_quarter_turn_is_counter_clockwise_about_the_half_pixel_centre():
    # Hand-computed: centre (2, 2), 90 deg: source (x, y) -> output (y, 4 - x),
    # so output (x', y') samples source (4 - y', x'); row 0 falls outside.
    image = np.arange(16, dtype=np.float32).reshape(4, 4, 1)
    got = train_augmentation.shift_scale_rotate(image, 90.0, 1.0, 0.0, 0.0).numpy()[..., 0]
    want = np.zeros((4, 4), np.float32)
    for yp in range(1, 4):
        for xp in range(4):
            want[yp, xp] = image[xp, 4 - yp, 0]
    np.testing.assert_allclose(got, want, atol=1e-4)


@pytest.mark.parametrize(
    "size, hole, centre, box",
    [
        (10, 4, (5, 5), (3, 7, 3, 7)),
        (10, 4, (0, 10), (0, 4, 8, 10)),  # clipped at the top, full height kept
        (10, 4, (10, 1), (8, 10, 0, 4)),
        (64, 25, (30, 0), (18, 43, 0, 25)),
    ],
)
def test_cutout_box_follows_albumentations(size, hole, centre, box):
    got = train_augmentation.cutout_box(size, hole, *centre)
    assert tuple(int(v) for v in got) == box
    image = np.ones((size, size, 3), np.float32)
    cut = train_augmentation.cutout(image, *got).numpy()
    y1, y2, x1, x2 = box
    assert (cut[y1:y2, x1:x2] == 0).all()
    assert cut.sum() == 3 * (size * size - (y2 - y1) * (x2 - x1))


def _keys(n):
    return [tf.constant([5, i], tf.int64) for i in range(n)]


def test_each_transform_fires_at_its_probability_and_within_its_ranges():
    rng = np.random.default_rng(1)
    image = tf.constant(rng.integers(30, 226, size=(24, 24, 3)).astype(np.uint8))
    n = 300
    warp = Augmentation(flip=False, warp_prob=0.7)
    warped = [
        not np.array_equal(
            train_augmentation.augment_decoded(image, key, warp).numpy(), image.numpy()
        )
        for key in _keys(n)
    ]
    assert abs(np.mean(warped) - 0.7) < 4 * math.sqrt(0.7 * 0.3 / n)

    cut = Augmentation(flip=False, cutout_prob=0.5, cutout_size=0.25)
    holes = []
    ones = tf.ones([24, 24, 3])
    for key in _keys(n):
        out = train_augmentation.augment_resized(ones, key, cut).numpy()
        holes.append(int((out[..., 0] == 0).sum()))
    holes = np.array(holes)
    assert abs(np.mean(holes > 0) - 0.5) < 4 * math.sqrt(0.25 / n)
    # A hole is 6 x 6 (int(0.25 * 24)) unless clipped by the right or bottom edge.
    assert holes.max() == 36 and set(holes[holes > 0]) <= {6 * k for k in range(1, 7)} | {
        a * b for a in range(1, 7) for b in range(1, 7)
    }

    # A smooth photo-like image: JPEG at quality 99-100 nearly preserves it.
    yy, xx = np.mgrid[0:32, 0:32]
    smooth = np.stack([4 * yy + 60, 3 * xx + 80, 2 * (xx + yy) + 40], -1).astype(np.uint8)
    pil_roundtrips = []
    for quality in (99, 100):
        buffer = io.BytesIO()
        Image.fromarray(smooth).save(buffer, format="JPEG", quality=quality)
        pil_roundtrips.append(np.asarray(Image.open(buffer)).astype(np.float64))
    jpeg = Augmentation(flip=False, jpeg_prob=0.5, jpeg_quality=(99, 100))
    num_changed = 0
    for key in _keys(40):
        out = train_augmentation.augment_decoded(tf.constant(smooth), key, jpeg).numpy()
        if np.array_equal(out, smooth):
            continue
        num_changed += 1
        # PIL's (libjpeg) re-encode at quality 99 or 100, up to the codecs'
        # rounding (TF decodes with a fast integer IDCT: about 1.2 levels).
        assert min(np.abs(out - r).mean() for r in pil_roundtrips) <= 2.0
    assert 8 <= num_changed <= 32


def test_same_key_same_image_and_streams_independent():
    image = tf.constant(np.random.default_rng(2).integers(0, 256, (20, 20, 3)).astype(np.uint8))
    aug = Augmentation(warp_prob=1.0)
    key = tf.constant([3, 9], tf.int64)
    a = train_augmentation.augment_decoded(image, key, aug).numpy()
    b = train_augmentation.augment_decoded(image, key, aug).numpy()
    np.testing.assert_array_equal(a, b)
    c = train_augmentation.augment_decoded(image, tf.constant([3, 10], tf.int64), aug).numpy()
    assert not np.array_equal(a, c)


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("cutout.prob", 1.5, "config.input.cutout.prob=1.5"),
        ("shift_scale_rotate.scale", 1.0, "config.input.shift_scale_rotate.scale=1.0"),
        ("jpeg.quality", (100, 99), "config.input.jpeg.quality=(100, 99)"),
    ],
)
def test_bad_values_name_the_config_key(key, value, message):
    config = config_lib.base_config()
    group, leaf = key.split(".")
    config.input[group][leaf] = value
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        augmentation_settings.from_config(config.input)


def test_glr2021_config_turns_on_the_released_augmentations():
    from configs_for_tests import load_config

    config = load_config("glr2021_dolg")
    aug = augmentation_settings.from_config(config.input)
    assert aug == Augmentation(
        flip=True,
        jpeg_prob=0.5,
        jpeg_quality=(99, 100),
        warp_prob=0.7,
        warp_shift=0.2,
        warp_scale=0.2,
        warp_rotate=10.0,
        cutout_prob=0.5,
        cutout_size=0.4,
    )
