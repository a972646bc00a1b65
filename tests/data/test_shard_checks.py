"""A corrupt record or a short shard names the shard (landmark_jax/data/shard_checks.py)."""

import os
import re
import shutil

import pytest
import tensorflow as tf

from landmark_jax.data import data_format, input_pipeline, shard_checks
from landmark_jax.runtime import sharding

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
    # The training stream names it too, before training (its headers are checked).
    train = data_format.read_split_info(copy, "train").files[0]
    open(train, "r+b").write(b"\0" * 16)  # the first record's length and checksum
    header = "the length header of record 1 at byte 0 fails its checksum"
    with pytest.raises(data_format.DataFormatError, match=rf"{train}: corrupt \({header}\)"):
        input_pipeline.train_iterator(
            copy, mesh=sharding.create_mesh(), global_batch_size=8, image_size=SIZE, seed=0
        )


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


def _cut(path, keep):
    """Keeps the first `keep` records of a shard: cut at a record boundary."""
    records = [r.numpy() for r in tf.data.TFRecordDataset(path)]
    with tf.io.TFRecordWriter(path) as writer:
        for record in records[:keep]:
            writer.write(record)
    return len(records)


def _train(data_dir):
    return input_pipeline.create_train_dataset(
        data_dir, image_size=SIZE, local_batch_size=4, seed=0, files_per_chunk=2
    )


def test_a_train_shard_cut_at_a_record_boundary_is_refused_naming_it(copied, tmp_path, monkeypatch):
    """Its records are counted from their headers when the train stream is
    created (was: trained on silently, and exact resume broke), once per
    state of the shards: a second stream, in this process or another, reads
    nothing; a shard rewritten since is counted again."""
    copy, _, _ = copied
    cache = tmp_path / "cache"
    monkeypatch.setenv(shard_checks.CACHE_ENV, str(cache))
    monkeypatch.setattr(shard_checks, "_verified", set())
    walked = []
    walk = shard_checks._walk_headers
    monkeypatch.setattr(shard_checks, "_walk_headers", lambda p: walked.append(p) or walk(p))
    info = data_format.read_split_info(copy, "train")
    before = os.listdir(os.path.dirname(info.files[0]))

    _train(copy)  # sound: every shard counted once
    assert sorted(walked) == sorted(info.files)
    assert len(os.listdir(cache / "shard_counts")) == 1
    assert os.listdir(os.path.dirname(info.files[0])) == before  # nothing in the data folder
    walked.clear()
    _train(copy)
    shard_checks._verified.clear()  # another process: the cache file on this machine
    _train(copy)
    assert walked == []

    shard = info.files[1]
    listed = info.file_examples[1]
    assert _cut(shard, listed // 2) == listed
    expected = (
        f"split 'train' of {copy}: 1 of its {len(info.files)} shard(s) disagree: "
        f"{shard}: {listed // 2} records, dataset_info.json lists {listed}; rebuild the split"
    )
    with pytest.raises(data_format.DataFormatError, match=re.escape(expected)):
        _train(copy)
    assert len(walked) == len(info.files)  # a new state: counted again


def test_a_train_shard_cut_inside_a_record_is_named_with_the_record(copied, monkeypatch, tmp_path):
    copy, _, _ = copied
    monkeypatch.setenv(shard_checks.CACHE_ENV, str(tmp_path / "cache"))
    shard = data_format.read_split_info(copy, "train").files[0]
    first = 12 + len(next(iter(tf.data.TFRecordDataset(shard))).numpy()) + 4
    data = open(shard, "rb").read()
    open(shard, "wb").write(data[: first + 100])  # the second record's header and 88 bytes
    with pytest.raises(
        data_format.DataFormatError,
        match=re.escape(f"{shard}: corrupt (the file ends inside record 2 at byte {first} ("),
    ):
        _train(copy)
