"""The on-disk data format shared by the builder and the input pipeline.

A data folder (`config.data_dir`, local or gs://) holds TFRecord shards named
`<split>-00000-of-000NN.tfrecord`, `dataset_info.json` (examples per split and
per file, number of classes) and `label_map.csv` (label, landmark_id, count).
Readers here check that the three agree, so a stale shard, a truncated label
map or a class count that does not match fails loudly before training.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import posixpath

import numpy as np

# TFRecord feature keys.
IMAGE = "image/encoded"
ID = "image/id"
LABEL = "image/class/label"
LANDMARK_ID = "image/class/landmark_id"
IS_CLEAN = "image/is_clean"

DATASET_INFO = "dataset_info.json"
LABEL_MAP = "label_map.csv"
LABELED_SPLITS = ("train", "val")


class DataFormatError(ValueError):
    """The data folder is missing a file or its files disagree."""


def _gfile():
    # Imported lazily: tf.io.gfile reads gs:// paths, and the builder's worker
    # processes should not pay for TensorFlow before they need it.
    import tensorflow as tf

    return tf.io.gfile


def _join(data_dir: str, name: str) -> str:
    return posixpath.join(data_dir, name) if "://" in data_dir else f"{data_dir.rstrip('/')}/{name}"


@dataclasses.dataclass(frozen=True)
class SplitInfo:
    """A split's shard files (full paths, in order) and example counts."""

    name: str
    files: tuple[str, ...]
    file_examples: tuple[int, ...]

    @property
    def num_examples(self) -> int:
        return sum(self.file_examples)

    @property
    def labeled(self) -> bool:
        return self.name in LABELED_SPLITS


def read_split_info(data_dir: str, split: str) -> SplitInfo:
    """Reads a split's files and counts from dataset_info.json and checks them.

    Args:
      data_dir: the data folder.
      split: 'train', 'val', 'index' or 'test'.

    Returns:
      The split's files in order with their example counts.

    Raises:
      DataFormatError: no dataset_info.json, the split is not in it, or the
        shard files on disk differ from the ones it lists (missing, stale or
        extra shards; an empty glob).
    """
    gfile = _gfile()
    info_path = _join(data_dir, DATASET_INFO)
    if not gfile.exists(info_path):
        raise DataFormatError(
            f"{info_path} not found: is data_dir={data_dir!r} the output folder of "
            "data_pipelines.gldv2_to_tfrecord?"
        )
    with gfile.GFile(info_path) as f:
        info = json.load(f)
    splits = info.get("splits", {})
    if split not in splits:
        raise DataFormatError(f"{info_path}: no split {split!r}; it has {sorted(splits)}")
    listed = splits[split]["files"]
    pattern = _join(data_dir, f"{split}-*-of-*.tfrecord")
    on_disk = sorted(posixpath.basename(p) for p in gfile.glob(pattern))
    names = [f["name"] for f in listed]
    if not on_disk:
        raise DataFormatError(f"no files match {pattern} (listed in {info_path}: {names[:3]}...)")
    if sorted(names) != on_disk:
        missing = sorted(set(names) - set(on_disk))
        extra = sorted(set(on_disk) - set(names))
        raise DataFormatError(
            f"{data_dir}: the {split!r} shards on disk differ from {info_path}: "
            f"missing {missing[:5]}, not listed {extra[:5]}; rebuild the split"
        )
    return SplitInfo(
        split,
        tuple(_join(data_dir, n) for n in names),
        tuple(int(f["num_examples"]) for f in listed),
    )


def read_num_classes(data_dir: str) -> int:
    """The number of classes recorded in dataset_info.json.

    Raises:
      DataFormatError: the file is missing or records no train split.
    """
    gfile = _gfile()
    info_path = _join(data_dir, DATASET_INFO)
    if not gfile.exists(info_path):
        raise DataFormatError(f"{info_path} not found")
    with gfile.GFile(info_path) as f:
        num_classes = json.load(f).get("num_classes")
    if not num_classes:
        raise DataFormatError(f"{info_path}: no num_classes (was the train split built?)")
    return int(num_classes)


@dataclasses.dataclass(frozen=True)
class LabelMap:
    """label -> landmark id and training-example count, indexed by label."""

    landmark_ids: np.ndarray  # int64 [num_classes]
    counts: np.ndarray  # int64 [num_classes]: training examples per class
    clean_counts: np.ndarray  # int64 [num_classes]: of which clean

    @property
    def num_classes(self) -> int:
        return len(self.counts)


def read_label_map(data_dir: str) -> LabelMap:
    """Reads label_map.csv: per-class landmark ids and training counts.

    Columns: label, landmark_id, count (training examples), and optionally
    num_clean (how many of them are in train_clean.csv).

    The counts feed the class weights (w_c ~ 1/ln n_c) and the dynamic
    margins, which index them by label, so the labels must be exactly
    0..C-1 in order and C must match dataset_info.json.

    Raises:
      DataFormatError: missing file or column, labels not 0..C-1, a count
        below 1, or a class count that differs from dataset_info.json.
    """
    gfile = _gfile()
    path = _join(data_dir, LABEL_MAP)
    if not gfile.exists(path):
        raise DataFormatError(f"{path} not found (written by gldv2_to_tfrecord --split=train)")
    with gfile.GFile(path) as f:
        rows = list(csv.DictReader(io.StringIO(f.read())))
    if not rows or {"label", "landmark_id", "count"} - set(rows[0]):
        raise DataFormatError(f"{path}: expected columns label,landmark_id,count")
    labels = np.array([int(r["label"]) for r in rows])
    if not np.array_equal(labels, np.arange(len(rows))):
        raise DataFormatError(f"{path}: labels are not 0..{len(rows) - 1} in order")
    counts = np.array([int(r["count"]) for r in rows], np.int64)
    if counts.min() < 1:
        bad = int(np.argmin(counts))
        raise DataFormatError(
            f"{path}: label {bad} has count {counts[bad]}; every class needs >= 1"
        )
    num_classes = read_num_classes(data_dir)
    if num_classes != len(rows):
        raise DataFormatError(
            f"{path} has {len(rows)} classes but {DATASET_INFO} says {num_classes}; "
            "rebuild the train split"
        )
    # num_clean is optional (label maps written by other tools): then every
    # example counts as clean, as the builder does without train_clean.csv.
    clean = np.array([int(r.get("num_clean") or r["count"]) for r in rows], np.int64)
    return LabelMap(np.array([int(r["landmark_id"]) for r in rows], np.int64), counts, clean)
