"""A corrupt record or a short shard names the shard (landmark_jax/shard_checks.py)."""

import re
import shutil

import pytest
import tensorflow as tf

from landmark_jax import data_format, input_pipeline, sharding

SIZE = 24


def _eval_ids(data_dir, split, batch):
    it, _ = input_pipeline.eval_iterator(
        data_dir, split, mesh=sharding.create_mesh(), global_batch_size=batch, image_size=SIZE
    )
    return [i for _, ids in it for i in ids if i]


@pytest.fixture
def copied(tiny_gldv2_tfrecords, tmp_path):
    """(a copy of the data folder to damage, its index split, the ids)."""
    _, out, ids = tiny_gldv2_tfrecords
    copy = str(tmp_path / "data")
    shutil.copytree(out, copy)
    return copy, data_format.read_split_info(copy, "index"), ids


def test_a_corrupt_shard_is_named(copied):
    copy, info, _ = copied
    bad = info.files[1]
    raw = bytearray(open(bad, "rb").read())
    middle = len(raw) // 2
    raw[middle : middle + 64] = bytes(64)  # a damaged block inside a record
    open(bad, "wb").write(bytes(raw))
    with pytest.raises(data_format.DataFormatError, match=rf"{bad}: corrupt") as error:
        _eval_ids(copy, "index", 8)
    assert info.files[0] not in str(error.value) and info.files[2] not in str(error.value)
    # The training stream names it too.
    train = data_format.read_split_info(copy, "train").files[0]
    open(train, "r+b").write(b"\0" * 16)  # the first record's length and checksum
    it = input_pipeline.train_iterator(
        copy, mesh=sharding.create_mesh(), global_batch_size=8, image_size=SIZE, seed=0
    )
    with pytest.raises(data_format.DataFormatError, match=rf"{train}: corrupt"):
        for _ in range(20):
            next(it)


def test_a_short_shard_is_named_and_no_present_image_is_dropped(copied):
    copy, info, ids = copied
    short = info.files[0]
    records = [r.numpy() for r in tf.data.TFRecordDataset(short)]
    with tf.io.TFRecordWriter(short) as writer:
        for record in records[:-3]:
            writer.write(record)
    # 21 images listed, 18 present: the padded stream still yields all 18.
    ds, num_steps = input_pipeline.create_eval_dataset(
        copy, "index", image_size=SIZE, local_batch_size=8
    )
    batches = list(ds.as_numpy_iterator())
    present = [i.decode() for b in batches for i in b["id"][b["mask"]]]
    assert num_steps == 3 and len(present) == len(set(present)) == 18
    assert set(present) < set(ids["index"])
    expected = f"{short}: {len(records) - 3} records, dataset_info.json lists {len(records)}"
    with pytest.raises(data_format.DataFormatError, match=re.escape(expected)):
        _eval_ids(copy, "index", 8)
