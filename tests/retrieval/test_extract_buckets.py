"""Shape buckets of aspect-kept extraction (retrieval/shape_buckets.py), without a model."""

import functools

import numpy as np
import pytest

from landmark_jax.retrieval import shape_buckets

from backbone_variables import random_variables


def _image(index: int, shape: tuple[int, int]) -> np.ndarray:
    # Pixel value 1 + index, so every image (and zero padding) is recognisable.
    return np.full((*shape, 3), 1 + index, np.uint8)


def test_bucket_rows_shrink_rare_shapes_to_a_multiple_of_the_devices():
    sizes = np.array([[8, 12]] * 20 + [[12, 8]] * 3 + [[6, 12]])
    rows = shape_buckets.bucket_rows(sizes, max_rows=16, row_multiple=4)
    assert rows == {(8, 12): 16, (12, 8): 4, (6, 12): 4}
    assert shape_buckets.bucket_rows(np.zeros((0, 2), np.int64), 16, 4) == {}
    with pytest.raises(ValueError, match="batch rows=10 must be a positive multiple of the 4"):
        shape_buckets.bucket_rows(sizes, max_rows=10, row_multiple=4)


def test_bucket_batches_hold_every_image_once_with_zero_padding():
    shapes = [(8, 12), (12, 8), (8, 12), (8, 12), (6, 12), (8, 12), (8, 12), (12, 8)]
    images = [_image(i, s) for i, s in enumerate(shapes)]
    rows = shape_buckets.bucket_rows(np.array(shapes), max_rows=4, row_multiple=2)
    assert rows == {(8, 12): 4, (12, 8): 2, (6, 12): 2}

    batches = list(shape_buckets.bucket_batches(iter(images), rows))
    # Full batches as soon as they fill (the 4th (8, 12) image is at position 5,
    # the 2nd (12, 8) at 7), then the partial ones in first-seen order.
    assert [list(indices) for indices, _ in batches] == [[0, 2, 3, 5], [1, 7], [6], [4]]
    seen = []
    for indices, batch in batches:
        shape = shapes[indices[0]]
        assert batch.shape == (rows[shape], *shape, 3) and batch.dtype == np.uint8
        for row, i in enumerate(indices):
            assert shapes[i] == shape
            np.testing.assert_array_equal(batch[row], images[i])
        assert not batch[len(indices) :].any()  # padding rows are zeros
        seen += list(indices)
    assert sorted(seen) == list(range(len(images)))


def test_bucket_batches_reject_an_unplanned_shape():
    with pytest.raises(ValueError, match=r"image 1 has shape \(5, 5\)"):
        list(shape_buckets.bucket_batches([_image(0, (4, 4)), _image(1, (5, 5))], {(4, 4): 2}))


def test_file_order_interleaves_process_shares_by_shard():
    # 5 shards of 2, 1, 3, 0, 2 examples read by 2 processes: process 0 reads
    # shards 0, 2, 4 (rows a0 a1 | c0 c1 c2 | e0 e1), process 1 shards 1, 3.
    file_examples = [2, 1, 3, 0, 2]
    shares = [
        {"ids": np.array(["a0", "a1", "c0", "c1", "c2", "e0", "e1"]), "x": np.arange(7)},
        {"ids": np.array(["b0"]), "x": np.array([70])},
    ]
    merged = shape_buckets.file_order(shares, file_examples)
    assert list(merged["ids"]) == ["a0", "a1", "b0", "c0", "c1", "c2", "e0", "e1"]
    np.testing.assert_array_equal(merged["x"], [0, 1, 70, 2, 3, 4, 5, 6])
    with pytest.raises(AssertionError, match="do not add up"):
        shape_buckets.file_order(shares, [2, 1, 3, 0, 1])


def test_eval_image_sizes_raise_a_side_below_the_model_minimum_to_it():
    """min_side raises only the sides below it (the other side as computed);
    with a multiple, to the first multiple at or above it."""
    from landmark_jax.data import sized_eval_input

    heights, widths = np.array([24, 300, 20]), np.array([200, 40, 20])
    sizes = sized_eval_input.eval_image_sizes
    native = sizes(heights, widths, resize="native", image_size=None, scale=1.0, min_side=32)
    np.testing.assert_array_equal(native, [[32, 200], [300, 40], [32, 32]])
    # Longer side 100: 24x200 -> 12x100, 300x40 -> 100x13, 20x20 -> 100x100.
    longer = sizes(heights, widths, resize="longer_side", image_size=100, scale=1.0, min_side=32)
    np.testing.assert_array_equal(longer, [[32, 100], [100, 32], [100, 100]])
    longer = sizes(
        heights, widths, resize="longer_side", image_size=100, scale=1.0, min_side=33, multiple=16
    )
    np.testing.assert_array_equal(longer, [[48, 96], [96, 48], [96, 96]])
    square = sizes(heights, widths, resize="square", image_size=64, scale=0.3535, min_side=32)
    np.testing.assert_array_equal(square, [[32, 32]] * 3)  # round(22.6) -> 32
    with pytest.raises(ValueError, match="min_side=0"):
        sizes(heights, widths, resize="native", image_size=None, scale=1.0, min_side=0)


@functools.cache
def _variables(model):
    """Random variables of `model` (numpy's, not a compiled init: any weights
    show where the map empties), drawn once: the lowering leaves them as
    they are, so both lowerings' tests share them."""
    return random_variables(model, (1, 32, 32, 3))


@pytest.mark.parametrize("lowering", ["xla", "im2col"])
def test_min_image_side_is_where_a_keras_dynamic_efficientnet_stops_giving_descriptors(lowering):
    """Keras's dynamic padding halves a side n to floor(n/2) at each of the 5
    stride-2 convolutions, so below 32 px the stride-32 map is empty (XLA:
    NaN descriptors; im2col: an error); TF SAME padding (ceil(n/2)) and the
    ResNets take any side. Checked against the models themselves."""
    import jax

    from landmark_jax.models import factory
    from landmark_jax.retrieval import extract

    config = {"name": "global", "backbone": "efficientnet_tiny", "embedding_dim": 8}
    config["conv_lowering"] = lowering
    dynamic = factory.create_model({**config, "padding": "keras_dynamic"})
    same = factory.create_model({**config, "padding": "same"})
    resnet = factory.create_model({**config, "backbone": "resnet_tiny"})
    assert extract.min_image_side(dynamic) == 32
    assert extract.min_image_side(same) == extract.min_image_side(resnet) == 1

    variables = _variables(
        factory.create_model({**config, "padding": "keras_dynamic", "conv_lowering": "xla"})
    )

    def descriptor(model, height):
        image = np.full((1, height, 40, 3), 128.0, np.float32)
        return np.asarray(jax.jit(model.apply)(variables, image))

    assert np.isfinite(descriptor(dynamic, 32)).all()
    try:
        below = descriptor(dynamic, 31)
    except TypeError:  # im2col: a negative slice of the empty map
        below = np.full(1, np.nan)
    assert not np.isfinite(below).all()
    # The same weights with TF SAME padding give a descriptor at 24 px.
    assert np.isfinite(descriptor(same, 24)).all()
