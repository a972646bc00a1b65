"""The tf.data input pipeline on a tiny built data folder, 8 CPU devices."""

import io
import json
import os
import shutil

import jax
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image
from tfds_builds import tfds_order

from landmark_jax.data import data_format, input_pipeline, sized_eval_input
from landmark_jax.data.augmentation_settings import Augmentation
from landmark_jax.runtime import sharding

import tiny_gldv2

SIZE = 24


@pytest.fixture
def data(tiny_gldv2_tfrecords):
    return tiny_gldv2_tfrecords  # conftest.py: built once per session


def take(ds, n):
    return [jax.tree.map(np.asarray, b) for b in ds.take(n).as_numpy_iterator()]


def train_ds(out, **kwargs):
    args = dict(image_size=SIZE, local_batch_size=4, seed=7, files_per_chunk=2, shuffle_buffer=8)
    args.update(kwargs)
    return input_pipeline.create_train_dataset(out, **args)


def test_global_batches_on_the_mesh(data):
    _, out, _ = data
    mesh = sharding.create_mesh()
    it = input_pipeline.train_iterator(
        out, mesh=mesh, global_batch_size=16, image_size=SIZE, seed=0
    )
    batch = next(it)
    assert batch["image"].shape == (16, SIZE, SIZE, 3) and batch["image"].dtype == np.uint8
    assert batch["label"].shape == (16,) and batch["label"].dtype == np.int32
    assert batch["is_clean"].dtype == np.int32
    for x in batch.values():
        assert x.sharding == sharding.batch_sharding(mesh)
        assert len(x.addressable_shards) == 8
        assert x.addressable_shards[0].data.shape[0] == 2
    num_classes = data_format.read_num_classes(out)
    assert int(batch["label"].min()) >= 0 and int(batch["label"].max()) < num_classes


def test_batch_that_does_not_divide_the_devices_is_an_error(data):
    _, out, _ = data
    with pytest.raises(ValueError, match="batch_size=12 must be a positive multiple of the 8"):
        input_pipeline.train_iterator(
            out, mesh=sharding.create_mesh(), global_batch_size=12, image_size=SIZE, seed=0
        )


def test_same_seed_same_stream_other_seed_other_stream(data):
    _, out, _ = data
    a, b = take(train_ds(out), 6), take(train_ds(out), 6)
    c = take(train_ds(out, seed=8), 6)
    for x, y in zip(a, b, strict=True):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])
    assert any(not np.array_equal(x["label"], z["label"]) for x, z in zip(a, c, strict=True))


def test_each_epoch_visits_every_training_example_once(data):
    _, out, _ = data
    label_map = data_format.read_label_map(out)
    epoch = int(label_map.counts.sum())
    # A batch size dividing the epoch, so epoch boundaries fall between batches.
    batch = next(d for d in range(7, 1, -1) if epoch % d == 0)
    batches = take(train_ds(out, local_batch_size=batch), 2 * epoch // batch)
    labels = np.concatenate([b["label"] for b in batches])
    np.testing.assert_array_equal(
        np.bincount(labels[:epoch], minlength=len(label_map.counts)), label_map.counts
    )
    np.testing.assert_array_equal(
        np.bincount(labels[epoch:], minlength=len(label_map.counts)), label_map.counts
    )
    # The second epoch is reshuffled.
    assert not np.array_equal(labels[:epoch], labels[epoch:])


@pytest.mark.parametrize("start_step", [1, 5, 9, 13])
def test_resume_at_step_equals_uninterrupted_stream(data, start_step):
    _, out, _ = data
    full = take(train_ds(out), start_step + 6)
    resumed = take(train_ds(out, start_step=start_step), 6)
    for x, y in zip(full[start_step:], resumed, strict=True):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])


def test_resume_reproduces_every_augmentation(data):
    _, out, _ = data
    glr2021 = Augmentation(jpeg_prob=0.5, warp_prob=0.7, cutout_prob=0.5)
    full = take(train_ds(out, augmentation=glr2021), 8)
    resumed = take(train_ds(out, augmentation=glr2021, start_step=5), 3)
    plain = take(train_ds(out, augmentation=Augmentation(flip=False)), 8)
    for x, y, p in zip(full[5:], resumed, plain[5:], strict=True):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])
        np.testing.assert_array_equal(x["label"], p["label"])
        assert not np.array_equal(x["image"], p["image"])


def test_flip_happens_and_is_the_only_change(data):
    _, out, _ = data
    flipped = take(train_ds(out, augmentation=Augmentation(flip=True)), 8)
    plain = take(train_ds(out, augmentation=Augmentation(flip=False)), 8)
    num_flipped = 0
    for f, p in zip(flipped, plain, strict=True):
        np.testing.assert_array_equal(f["label"], p["label"])
        np.testing.assert_array_equal(f["is_clean"], p["is_clean"])
        for fi, pi in zip(f["image"], p["image"], strict=True):
            if np.array_equal(fi, pi[:, ::-1]) and not np.array_equal(fi, pi):
                num_flipped += 1
            else:
                np.testing.assert_array_equal(fi, pi)
    assert 8 <= num_flipped <= 24  # 32 images, p = 0.5


def test_eval_images_match_an_independent_decode_and_resize(data):
    root, out, ids = data
    ds, _ = input_pipeline.create_eval_dataset(out, "index", image_size=SIZE, local_batch_size=8)
    batch = next(ds.as_numpy_iterator())
    for image, image_id in zip(batch["image"], batch["id"], strict=True):
        original = np.asarray(
            Image.open(tiny_gldv2.image_path(root, "index", image_id.decode())), np.float32
        )
        # jax's half-pixel bilinear resize is an implementation independent of tf.image.
        expected = jax.image.resize(original, (SIZE, SIZE, 3), "linear", antialias=False)
        assert np.abs(np.asarray(expected) - image.astype(np.float32)).mean() < 2.0


def test_eval_covers_every_id_once_in_order_on_8_devices(data):
    _, out, ids = data
    mesh = sharding.create_mesh()
    it, num_steps = input_pipeline.eval_iterator(
        out, "index", mesh=mesh, global_batch_size=8, image_size=SIZE
    )
    seen, masks = [], []
    for batch, batch_ids in it:
        assert batch["image"].shape == (8, SIZE, SIZE, 3)
        assert batch["mask"].sharding == sharding.batch_sharding(mesh)
        mask = np.asarray(batch["mask"])
        assert list(batch_ids[~mask]) == [""] * int((~mask).sum())
        seen += list(batch_ids[mask])
        masks.append(mask)
    assert len(masks) == num_steps == 3  # 21 images in batches of 8
    assert seen == tfds_order(out, "index")
    assert sorted(seen) == sorted(ids["index"])
    assert np.concatenate(masks).sum() == 21


def test_eval_shares_of_two_processes_are_disjoint_and_equal_in_steps(data):
    _, out, ids = data
    shares, steps = [], []
    for p in range(2):
        ds, n = input_pipeline.create_eval_dataset(
            out, "index", image_size=SIZE, local_batch_size=4, process_index=p, process_count=2
        )
        batches = list(ds.as_numpy_iterator())
        assert len(batches) == n
        steps.append(n)
        shares.append(
            [i.decode() for b in batches for i, m in zip(b["id"], b["mask"], strict=True) if m]
        )
    assert steps[0] == steps[1]
    assert sorted(shares[0] + shares[1]) == sorted(ids["index"])
    assert not set(shares[0]) & set(shares[1])


def test_val_split_carries_labels(data):
    _, out, _ = data
    ds, _ = input_pipeline.create_eval_dataset(out, "val", image_size=SIZE, local_batch_size=4)
    batch = next(ds.as_numpy_iterator())
    assert batch["label"].dtype == np.int32


def _write_split(out, split, examples):
    """Replaces a split of a TFDS build by one hand-written shard, recorded in
    its dataset_info.json (bypassing the builder's checks)."""
    for f in os.listdir(out):
        if f.startswith(f"gldv2-{split}."):
            os.remove(os.path.join(out, f))
    with tf.io.TFRecordWriter(os.path.join(out, f"gldv2-{split}.tfrecord-00000-of-00001")) as w:
        for feature in examples:
            w.write(
                tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()
            )
    info_path = os.path.join(out, "dataset_info.json")
    info = json.load(open(info_path))
    (entry,) = [s for s in info["splits"] if s["name"] == split]
    entry["shardLengths"] = [str(len(examples))]
    json.dump(info, open(info_path, "w"))


def _jpeg(mode):
    buf = io.BytesIO()
    Image.new(mode, (20, 30), 128).save(buf, format="JPEG")
    return tf.train.Feature(bytes_list=tf.train.BytesList(value=[buf.getvalue()]))


def _int(v):
    return tf.train.Feature(int64_list=tf.train.Int64List(value=[v]))


def test_missing_label_is_an_error_not_class_0(data, tmp_path):
    _, out, _ = data
    copy = str(tmp_path / "data")
    shutil.copytree(out, copy)
    _write_split(
        copy, "train", [{data_format.IMAGE: _jpeg("RGB"), data_format.IS_CLEAN: _int(1)}] * 4
    )
    with pytest.raises(tf.errors.InvalidArgumentError, match="Feature: label"):
        take(train_ds(copy, augmentation=Augmentation(flip=False)), 1)
    _write_split(
        copy,
        "train",
        [
            {
                data_format.IMAGE: _jpeg("RGB"),
                data_format.IS_CLEAN: _int(1),
                data_format.LABEL: _int(999),
            }
        ]
        * 4,
    )
    with pytest.raises(tf.errors.InvalidArgumentError, match="num_classes"):
        take(train_ds(copy, augmentation=Augmentation(flip=False)), 1)


def test_grayscale_jpeg_decodes_to_three_channels(data, tmp_path):
    _, out, _ = data
    copy = str(tmp_path / "data")
    shutil.copytree(out, copy)
    gray = {
        data_format.IMAGE: _jpeg("L"),
        data_format.IS_CLEAN: _int(1),
        data_format.LABEL: _int(0),
    }
    _write_split(copy, "train", [gray] * 4)
    batch = take(train_ds(copy), 1)[0]
    assert batch["image"].shape == (4, SIZE, SIZE, 3)
    np.testing.assert_allclose(batch["image"], 128, atol=2)


def test_shards_listed_by_tfds_must_be_on_disk(data, tmp_path):
    _, out, _ = data
    copy = str(tmp_path / "data")
    shutil.copytree(out, copy)
    os.remove(os.path.join(copy, "gldv2-train.tfrecord-00002-of-00004"))
    with pytest.raises(data_format.DataFormatError, match="missing.*train.tfrecord-00002-of"):
        train_ds(copy)
    # A folder above the build finds it; one without a build says what it holds.
    with pytest.raises(data_format.DataFormatError, match="missing"):
        train_ds(str(tmp_path))
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "train.csv").write_text("id\n")
    with pytest.raises(
        data_format.DataFormatError, match="not a TensorFlow Datasets build.*train.csv"
    ):
        train_ds(str(tmp_path / "other"))


def test_class_counts_must_agree_with_the_class_count_and_splits(data, tmp_path):
    _, out, _ = data
    copy = str(tmp_path / "data")
    shutil.copytree(out, copy)
    path = os.path.join(copy, "metadata.json")
    metadata = json.load(open(path))
    metadata["class_counts"]["count"] = metadata["class_counts"]["count"][:-1]
    json.dump(metadata, open(path, "w"))
    with pytest.raises(data_format.DataFormatError, match="count has 5 entries for 6 classes"):
        data_format.read_label_map(copy)
    counts = metadata["class_counts"]
    counts["count"] += [counts["train_val_count"][-1]]
    counts["count"][0] += 1
    counts["train_val_count"][0] += 1
    json.dump(metadata, open(path, "w"))
    with pytest.raises(data_format.DataFormatError, match="the splits hold"):
        data_format.read_label_map(copy)


def test_eval_image_sizes_square_longer_side_and_native():
    heights, widths = np.array([768, 1024, 100, 40, 5]), np.array([1024, 768, 333, 40, 7])
    sizes = sized_eval_input.eval_image_sizes
    square = sizes(heights, widths, resize="square", image_size=512, scale=0.5)
    np.testing.assert_array_equal(square, [[256, 256]] * 5)
    longer = sizes(heights, widths, resize="longer_side", image_size=512, scale=0.5)
    # round(100 * 256 / 333) = round(76.88); round(5 * 256 / 7) = round(182.86).
    np.testing.assert_array_equal(
        longer, [[192, 256], [256, 192], [77, 256], [256, 256], [183, 256]]
    )
    # DOLG's im_scale: round(h * s), round(w * s), half to even (2.5 -> 2, 3.5 -> 4).
    native = sizes(heights, widths, resize="native", image_size=None, scale=0.5)
    np.testing.assert_array_equal(native, [[384, 512], [512, 384], [50, 166], [20, 20], [2, 4]])
    np.testing.assert_array_equal(
        sizes(heights, widths, resize="native", image_size=None, scale=0.7071)[:3],
        [[543, 724], [724, 543], [71, 235]],
    )
    # A multiple rounds every side to the nearest multiple, at least one.
    np.testing.assert_array_equal(
        sizes(heights, widths, resize="longer_side", image_size=512, scale=0.5, multiple=16),
        [[192, 256], [256, 192], [80, 256], [256, 256], [176, 256]],
    )
    np.testing.assert_array_equal(
        sizes(heights, widths, resize="native", image_size=None, scale=0.5, multiple=16)[3:],
        [[16, 16], [16, 16]],
    )
    assert sizes(heights[:0], widths[:0], resize="native", image_size=None, scale=1.0).shape == (
        0,
        2,
    )


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(resize="squash"), "resize='squash'"),
        (dict(scale=0.0), "scale=0.0"),
        (dict(multiple=0), "multiple=0"),
        (dict(multiple=1.5), "multiple=1.5"),
        (dict(image_size=None), "image_size=None"),
        (dict(heights=[4, 0]), r"image 1 has size \(0, 5\)"),
    ],
)
def test_eval_image_sizes_errors_name_the_value(kwargs, message):
    args = dict(heights=[4, 6], widths=[5, 5], resize="longer_side", image_size=8, scale=1.0)
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        sized_eval_input.eval_image_sizes(args.pop("heights"), args.pop("widths"), **args)


def _records(out, split):
    """{id: encoded image} of a split, read with protobuf."""
    info = data_format.read_split_info(out, split)
    rows = {}
    for raw in tf.data.TFRecordDataset(list(info.files)).as_numpy_iterator():
        feats = tf.train.Example.FromString(raw).features.feature
        rows[feats[data_format.ID].bytes_list.value[0].decode()] = feats[
            data_format.IMAGE
        ].bytes_list.value[0]
    return rows


def test_sized_eval_images_keep_the_aspect_ratio_and_cover_each_example_once(data):
    root, out, ids = data
    encoded = _records(out, "index")
    seen = []
    for p in range(2):
        index = sized_eval_input.read_eval_index(out, "index", process_index=p, process_count=2)
        assert index.labels is None
        sizes = sized_eval_input.eval_image_sizes(
            index.heights, index.widths, resize="longer_side", image_size=SIZE, scale=1.0
        )
        ds = sized_eval_input.create_sized_eval_dataset(
            out, "index", sizes, process_index=p, process_count=2
        )
        images = list(ds.as_numpy_iterator())
        assert len(images) == len(index.ids) == len(sizes)
        for image_id, h, w, size, image in zip(
            index.ids, index.heights, index.widths, sizes, images, strict=True
        ):
            original = np.asarray(
                Image.open(tiny_gldv2.image_path(root, "index", image_id)), np.float32
            )
            assert (h, w) == original.shape[:2]  # the JPEG header's size
            assert max(size) == SIZE and image.shape == (*size, 3) and image.dtype == np.uint8
            assert abs(size[0] / size[1] - h / w) <= 1 / min(size)  # aspect ratio kept
            # The same op as create_eval_dataset, from the stored bytes ...
            same_op = tf.image.resize(
                tf.io.decode_image(encoded[image_id], channels=3), size, method="bilinear"
            )
            np.testing.assert_array_equal(
                image, np.clip(np.round(same_op.numpy()), 0, 255).astype(np.uint8)
            )
            # ... and close to an independent implementation (jax, half-pixel).
            expected = jax.image.resize(original, (*size, 3), "linear", antialias=False)
            assert np.abs(np.asarray(expected) - image.astype(np.float32)).mean() < 2.0
        seen += list(index.ids)
    assert sorted(seen) == sorted(ids["index"])


def test_sized_eval_reads_png_sizes_labels_and_checks_the_size_table(data, tmp_path):
    _, out, _ = data
    copy = str(tmp_path / "data")
    shutil.copytree(out, copy)
    png = io.BytesIO()
    Image.new("RGB", (20, 30), (10, 200, 30)).save(png, format="PNG")
    examples = [
        {
            data_format.IMAGE: tf.train.Feature(bytes_list=tf.train.BytesList(value=[image])),
            data_format.ID: tf.train.Feature(bytes_list=tf.train.BytesList(value=[name])),
            data_format.LABEL: _int(label),
            data_format.IS_CLEAN: _int(1),
        }
        for image, name, label in (
            (png.getvalue(), b"png", 3),
            (_jpeg("RGB").bytes_list.value[0], b"jpeg", 5),
        )
    ]
    _write_split(copy, "val", examples)
    index = sized_eval_input.read_eval_index(copy, "val")
    assert list(index.ids) == ["png", "jpeg"]
    np.testing.assert_array_equal(index.labels, [3, 5])
    np.testing.assert_array_equal(index.heights, [30, 30])
    np.testing.assert_array_equal(index.widths, [20, 20])
    sizes = np.array([[9, 6], [30, 20]])
    images = list(
        sized_eval_input.create_sized_eval_dataset(copy, "val", sizes).as_numpy_iterator()
    )
    assert [i.shape for i in images] == [(9, 6, 3), (30, 20, 3)]
    np.testing.assert_allclose(images[0].reshape(-1, 3), [[10, 200, 30]] * 54, atol=1)
    with pytest.raises(ValueError, match=r"sizes has shape \(1, 2\).*expected \(2, 2\)"):
        sized_eval_input.create_sized_eval_dataset(copy, "val", sizes[:1])
