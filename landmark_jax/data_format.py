"""The on-disk data format shared by the builder and the input pipeline.

A data folder (`config.data_dir`, local or gs://) holds TFRecord shards named
`<split>-00000-of-000NN.tfrecord`, `dataset_info.json` (examples per split and
per file, number of classes) and `label_map.csv` (label, landmark_id, count,
num_clean, train_val_count, train_val_clean). Readers here check that the three
agree, so a stale shard, a truncated label map or a class count that does not
match fails loudly before training.

The Revisited Oxford/Paris ground truth (the published gnd pickles, copied to
`gnd.pkl` by `data_pipelines.revisited_to_tfrecord`) is read here too.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import math
import pickle
from collections.abc import Mapping
from typing import Any

import numpy as np

from landmark_jax import file_io

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


def shard_name(split: str, index: int, num_shards: int) -> str:
    """`<split>-00000-of-000NN.tfrecord`: the name the builders give a shard."""
    return f"{split}-{index:05d}-of-{num_shards:05d}.tfrecord"


def shard_pattern(split: str) -> str:
    """The glob that matches every `shard_name(split, ...)`, as readers list a split."""
    return f"{split}-*-of-*.tfrecord"


@dataclasses.dataclass(frozen=True)
class SplitInfo:
    """A split's shard files (full paths, in order) and example counts."""

    name: str
    files: tuple[str, ...]
    file_examples: tuple[int, ...]
    # Each shard's record digest from the builder ("" for data folders built
    # before digests were recorded).
    file_digests: tuple[str, ...] = ()

    @property
    def identity(self) -> list[list]:
        """What the split holds, as JSON: [name, examples, digest] per shard.

        A rebuilt split has another identity unless its records are the
        same, so caches keyed on it (the evaluation's embeddings) go stale
        with the data, not with the folder's name.
        """
        digests = self.file_digests or ("",) * len(self.files)
        return [
            [file_io.basename(f), n, d]
            for f, n, d in zip(self.files, self.file_examples, digests, strict=True)
        ]

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
    info_path = file_io.join(data_dir, DATASET_INFO)
    if not file_io.exists(info_path):
        raise DataFormatError(
            f"{info_path} not found: is data_dir={data_dir!r} the output folder of "
            "data_pipelines.gldv2_to_tfrecord?"
        )
    info = file_io.read_json(info_path)
    splits = info.get("splits", {})
    if split not in splits:
        raise DataFormatError(f"{info_path}: no split {split!r}; it has {sorted(splits)}")
    listed = splits[split]["files"]
    pattern = file_io.join(data_dir, shard_pattern(split))
    on_disk = sorted(file_io.basename(p) for p in file_io.glob(pattern))
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
        tuple(file_io.join(data_dir, n) for n in names),
        tuple(int(f["num_examples"]) for f in listed),
        tuple(str(f.get("sha256", "")) for f in listed),
    )


def read_num_classes(data_dir: str) -> int:
    """The number of classes recorded in dataset_info.json.

    Raises:
      DataFormatError: the file is missing or records no train split.
    """
    info_path = file_io.join(data_dir, DATASET_INFO)
    if not file_io.exists(info_path):
        raise DataFormatError(f"{info_path} not found")
    num_classes = file_io.read_json(info_path).get("num_classes")
    if not num_classes:
        raise DataFormatError(f"{info_path}: no num_classes (was the train split built?)")
    return int(num_classes)


# label_map.csv columns. `count` / `num_clean` describe the train split (what
# an epoch holds); `train_val_count` / `train_val_clean` the class's images in
# train + val, i.e. every row of the CSV the builder read, which is what the
# GLR2020 class weights and the GLR2021 margins count (see losses.py).
LABEL_MAP_COLUMNS = (
    "label",
    "landmark_id",
    "count",
    "num_clean",
    "train_val_count",
    "train_val_clean",
)
_TRAIN_VAL_COLUMNS = ("train_val_count", "train_val_clean")


@dataclasses.dataclass(frozen=True)
class LabelMap:
    """Per-class landmark ids and example counts, indexed by label."""

    landmark_ids: np.ndarray  # int64 [num_classes]
    counts: np.ndarray  # int64 [num_classes]: training examples per class
    clean_counts: np.ndarray  # int64 [num_classes]: of which clean
    train_val_counts: np.ndarray  # int64 [num_classes]: examples in train + val
    train_val_clean_counts: np.ndarray  # int64 [num_classes]: of which clean

    @property
    def num_classes(self) -> int:
        return len(self.counts)


def _int_column(path: str, rows: list[dict], column: str) -> np.ndarray:
    """One integer column of label_map.csv; a bad cell names its line."""
    values = []
    for line, row in enumerate(rows, start=2):
        try:
            values.append(int(row[column]))
        except (TypeError, ValueError):
            raise DataFormatError(
                f"{path}:{line}: {column} {row[column]!r} is not an integer"
            ) from None
    return np.array(values, np.int64)


def read_label_map(data_dir: str) -> LabelMap:
    """Reads label_map.csv: per-class landmark ids and example counts.

    Columns: label, landmark_id, count (training examples), optionally
    num_clean (how many of them are in train_clean.csv; absent: all), and
    train_val_count / train_val_clean (the class's examples in train + val and
    how many are clean). A label map written before the train_val columns
    existed is read only when the folder has no `val` split (then train + val
    is train); with a val split the train-only counts would be the wrong n_c
    for the class weights, so it is an error, never a silent fallback.

    The counts feed the class weights (w_c ~ 1/ln n_c) and the dynamic
    margins, which index them by label, so the labels must be exactly
    0..C-1 in order and C must match dataset_info.json.

    Args:
      data_dir: the data folder.

    Returns:
      The label map.

    Raises:
      DataFormatError: missing file or column (only one of the train_val
        columns, or neither with a `val` split), a non-integer cell, labels
        not 0..C-1, a count below 1, train_val counts below the train counts
        or a clean count outside [0, count], or totals that disagree with
        dataset_info.json (class count, train + val examples).
    """
    path = file_io.join(data_dir, LABEL_MAP)
    if not file_io.exists(path):
        raise DataFormatError(f"{path} not found (written by gldv2_to_tfrecord --split=train)")
    rows = list(csv.DictReader(io.StringIO(file_io.read_text(path))))
    if not rows or {"label", "landmark_id", "count"} - set(rows[0]):
        raise DataFormatError(f"{path}: expected columns label,landmark_id,count")
    labels = _int_column(path, rows, "label")
    if not np.array_equal(labels, np.arange(len(rows))):
        raise DataFormatError(f"{path}: labels are not 0..{len(rows) - 1} in order")
    counts = _int_column(path, rows, "count")
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
    clean = _int_column(path, rows, "num_clean") if "num_clean" in rows[0] else counts.copy()
    _check_clean(path, "num_clean", clean, counts)

    splits = file_io.read_json(file_io.join(data_dir, DATASET_INFO)).get("splits", {})
    present = [c for c in _TRAIN_VAL_COLUMNS if c in rows[0]]
    if len(present) == 1:
        raise DataFormatError(
            f"{path}: has {present[0]} but not "
            f"{next(c for c in _TRAIN_VAL_COLUMNS if c not in present)}; "
            "rebuild the train split"
        )
    if present:
        train_val = _int_column(path, rows, "train_val_count")
        train_val_clean = _int_column(path, rows, "train_val_clean")
        below = np.flatnonzero(train_val < counts)
        if below.size:
            bad = int(below[0])
            raise DataFormatError(
                f"{path}: label {bad} has train_val_count {train_val[bad]} < count "
                f"{counts[bad]}; rebuild the train split"
            )
        _check_clean(path, "train_val_clean", train_val_clean, train_val)
    elif "val" in splits:
        # Without the columns only the train counts are known; using them as
        # n_c would change the class weights and could leave a class at
        # n_c = 1 (ln 1 = 0) that has more images in val.
        raise DataFormatError(
            f"{path}: no train_val_count,train_val_clean columns, and {DATASET_INFO} "
            "lists a 'val' split, so the per-class counts over train + val that the "
            "class weights and margins use are unknown; rebuild the train split with "
            "data_pipelines.gldv2_to_tfrecord --split=train"
        )
    else:
        # No val split: train + val is the train split.
        train_val, train_val_clean = counts.copy(), clean.copy()

    listed = sum(int(splits[s]["num_examples"]) for s in LABELED_SPLITS if s in splits)
    if int(train_val.sum()) != listed:
        raise DataFormatError(
            f"{path}: the train_val counts sum to {int(train_val.sum())} but "
            f"{DATASET_INFO} lists {listed} train + val examples; rebuild the train split"
        )
    landmark_ids = _int_column(path, rows, "landmark_id")
    return LabelMap(landmark_ids, counts, clean, train_val, train_val_clean)


def _check_clean(path: str, column: str, clean: np.ndarray, counts: np.ndarray) -> None:
    """Raises DataFormatError unless 0 <= clean <= counts per class."""
    bad_rows = np.flatnonzero((clean < 0) | (clean > counts))
    if bad_rows.size:
        bad = int(bad_rows[0])
        raise DataFormatError(
            f"{path}: label {bad} has {column} {clean[bad]}, outside [0, {counts[bad]}]"
        )


# ---------------------------------------------------- Revisited Oxford/Paris


class _GndUnpickler(pickle.Unpickler):
    # The published gnd pickles hold only dicts, lists, str, int and float;
    # refusing every global keeps a tampered file from running code.
    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")


def read_revisited_gnd(path: str) -> dict[str, Any]:
    """Reads a Revisited Oxford/Paris ground truth pickle (gnd_roxford5k.pkl, gnd_rparis6k.pkl).

    Args:
      path: the pickle: a dict with 'imlist' (database image names),
        'qimlist' (query image names) and 'gnd' (per query: 'bbx' [x1, y1,
        x2, y2] and 'easy', 'hard', 'junk' lists of 0-based imlist indices).

    Returns:
      {'imlist': [str], 'qimlist': [str], 'gnd': [{'bbx': [4 floats],
      'easy'|'hard'|'junk': [int]}]}, ready for metrics.revisited_map.

    Raises:
      DataFormatError: the file is missing or not such a pickle, a key is
        missing, the lengths disagree, an index is outside imlist, or a bbx is
        not 4 finite numbers.
    """
    if not file_io.exists(path):
        raise DataFormatError(f"{path}: file not found")
    try:
        data = _GndUnpickler(io.BytesIO(file_io.read_bytes(path))).load()
    except Exception as e:  # pickle raises many kinds on a bad file
        raise DataFormatError(f"{path}: not a readable gnd pickle: {e}") from e
    if not isinstance(data, Mapping):
        raise DataFormatError(f"{path}: expected a dict, got {type(data).__name__}")
    missing = [k for k in ("imlist", "qimlist", "gnd") if k not in data]
    if missing:
        raise DataFormatError(f"{path}: missing key(s) {missing}; has {sorted(data)}")
    imlist, qimlist, gnd = list(data["imlist"]), list(data["qimlist"]), list(data["gnd"])
    if len(gnd) != len(qimlist):
        raise DataFormatError(
            f"{path}: {len(gnd)} gnd entries for {len(qimlist)} queries in qimlist"
        )
    num_db = len(imlist)
    out = []
    for q, entry in enumerate(gnd):
        name = f"{path}: gnd[{q}] (query {qimlist[q]!r})"
        if not isinstance(entry, Mapping):
            raise DataFormatError(f"{name}: expected a dict, got {type(entry).__name__}")
        lacking = [k for k in ("bbx", "easy", "hard", "junk") if k not in entry]
        if lacking:
            raise DataFormatError(f"{name}: missing key(s) {lacking}")
        bbx = list(entry["bbx"])
        if len(bbx) != 4 or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in bbx):
            raise DataFormatError(f"{name}: bbx must be 4 finite numbers, got {bbx}")
        parsed: dict[str, Any] = {"bbx": [float(v) for v in bbx]}
        for key in ("easy", "hard", "junk"):
            indices = list(entry[key])
            bad = [i for i in indices if isinstance(i, bool) or not isinstance(i, int)]
            bad += [i for i in indices if i not in bad and not 0 <= i < num_db]
            if bad:
                raise DataFormatError(
                    f"{name}: '{key}' holds {bad[:5]}, not indices into imlist "
                    f"(0..{num_db - 1}, 0-based)"
                )
            parsed[key] = indices
        out.append(parsed)
    return {"imlist": imlist, "qimlist": qimlist, "gnd": out}
