"""The data sets the project reads: TensorFlow Datasets builds, and what they hold.

`config.data_dir` is a TFDS build (a folder with dataset_info.json and
features.json, e.g. `<tfds data dir>/gldv2/clean/1.0.0`), local or gs://,
written by the builders in data_pipelines (gldv2_builder, demo_builder,
revisited_builder) or by any TFDS builder with the same features. A folder
above exactly one such build (e.g. the TFDS data dir `demo_data/tfds`) is
accepted too. Everything about the files comes from TFDS's metadata: the
shard files and their lengths per split (`SplitInfo`), the class count (the
`label` ClassLabel), the landmark ids (its names) and the per-class counts
the losses need (the builder's metadata.json, `read_label_map`). Readers here
check that these agree, so a stale or truncated build fails loudly before
training.

The Revisited Oxford/Paris ground truth pickles are read and checked in
revisited_gnd.py.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping

import numpy as np

from landmark_jax.runtime import file_io

# Feature names of the landmark data sets (gldv2_builder.landmark_features).
IMAGE = "image"
ID = "id"
LABEL = "label"
LANDMARK_ID = "landmark_id"
IS_CLEAN = "is_clean"
# Keys of the builders' metadata.json.
CLASS_COUNTS = "class_counts"
SKIPPED_IMAGES = "skipped_images"
BUILD_ID = "build_id"
REVISITED_GND = "gnd"

LABELED_SPLITS = ("train", "val")
# How evaluation sizes an image (eval.resize, eval.revisited_resize): squashed
# to image_size squared, its longer side to image_size, or its own size
# (sized_eval_input.py). Here, free of TensorFlow, for the config checks.
RESIZE_MODES = ("square", "longer_side", "native")
# The files TFDS writes into every build.
_BUILD_FILES = ("dataset_info.json", "features.json")
# features.json names each feature's class here; TFDS imports its module.
_CLASS_KEY = "pythonClassName"
_TFDS_PACKAGE = "tensorflow_datasets."
# The prefix of the folders TFDS builds into before renaming them into place
# (`<config>/incomplete.XXXXXX_<version>`; TFDS's constants.INCOMPLETE_PREFIX),
# which data_pipelines.build_dataset also gives its staged rebuilds: never a
# finished build, even when a killed build left metadata files in one.
TEMPORARY_PREFIX = "incomplete."


class DataFormatError(ValueError):
    """The data folder is not a TFDS build, lacks a split, or its files disagree."""


def _is_build(path: str) -> bool:
    return all(file_io.exists(file_io.join(path, name)) for name in _BUILD_FILES)


def is_temporary(path: str) -> bool:
    """True for a TFDS build's temporary folder (`incomplete.*`, see TEMPORARY_PREFIX)."""
    return file_io.basename(path).startswith(TEMPORARY_PREFIX)


def find_build(data_dir: str) -> str:
    """The TFDS build a data_dir names: itself, or the one build below it.

    Args:
      data_dir: a build folder (dataset_info.json + features.json), or a
        folder holding exactly one build up to three levels down
        (`<name>/<config>/<version>/`, as in a TFDS data dir). Builds inside
        `incomplete.*` folders (unfinished, see TEMPORARY_PREFIX) are not
        counted.

    Returns:
      The build folder.

    Raises:
      DataFormatError: no build there (naming what was found), or several
        (naming them).
    """
    if _is_build(data_dir):
        return data_dir
    if not file_io.isdir(data_dir):
        raise DataFormatError(f"data_dir={data_dir!r}: no such folder")
    found_below = []
    for depth in (1, 2, 3):
        pattern = file_io.join(data_dir, *["*"] * depth, "features.json")
        found_below += [file_io.dirname(p) for p in file_io.glob(pattern)]
    unfinished = sorted(b for b in set(found_below) if _below_temporary(data_dir, b))
    builds = sorted(b for b in set(found_below) if b not in unfinished and _is_build(b))
    if len(builds) == 1:
        return builds[0]
    if builds:
        raise DataFormatError(
            f"data_dir={data_dir!r} holds {len(builds)} TFDS builds: {builds[:6]}; "
            "point data_dir at one of them"
        )
    found = sorted(file_io.listdir(data_dir))[:10]
    hint = (
        f" (only unfinished builds, in TFDS's temporary folders: {unfinished[:3]})"
        if unfinished
        else ""
    )
    raise DataFormatError(
        f"data_dir={data_dir!r} is not a TensorFlow Datasets build: no dataset_info.json "
        f"with features.json in it or below it; it holds {found}{hint}. Build one with "
        "python -m data_pipelines.build_dataset"
    )


def _below_temporary(data_dir: str, path: str) -> bool:
    """True if a folder between data_dir (exclusive) and path (inclusive) is temporary."""
    while len(path) > len(data_dir.rstrip("/")):
        if is_temporary(path):
            return True
        parent = file_io.dirname(path)
        if parent == path:
            break
        path = parent
    return False


def open_build(data_dir: str):
    """The TFDS builder of a build folder (tfds.builder_from_directory).

    Opened once per process for as long as the build's dataset_info.json and
    metadata.json stay the same (a run asks for it dozens of times).

    Raises:
      DataFormatError: data_dir is not a TFDS build (see find_build), or its
        features.json names a class TFDS would import from outside TFDS
        (check_feature_classes).
    """
    build = find_build(data_dir)
    check_feature_classes(build)
    texts = tuple(
        file_io.read_text(path) if file_io.exists(path) else ""
        for path in (
            file_io.join(build, name)
            for name in ("dataset_info.json", "metadata.json", "features.json")
        )
    )
    return _open_build(build, texts)


def check_feature_classes(build: str) -> None:
    """Refuses a features.json naming a class outside TensorFlow Datasets.

    TFDS imports the module of every `pythonClassName` in features.json to
    find its feature class, so whoever can write a shared data folder could
    make every trainer and evaluator import any installed module (its import
    side effects run). The builds here use TFDS's own feature classes only.

    Args:
      build: a build folder (see find_build).

    Raises:
      DataFormatError: features.json is not JSON, or names a class whose
        name does not start with `tensorflow_datasets.` (naming the file and
        the class).
    """
    path = file_io.join(build, "features.json")
    try:
        features = file_io.read_json(path)
    except ValueError as e:
        raise DataFormatError(str(e)) from None
    pending = [features]
    while pending:
        value = pending.pop()
        if isinstance(value, dict):
            name = value.get(_CLASS_KEY)
            if name is not None and not str(name).startswith(_TFDS_PACKAGE):
                raise DataFormatError(
                    f"{path}: {_CLASS_KEY} {name!r} is not a TensorFlow Datasets feature "
                    f"class (expected {_TFDS_PACKAGE}...): TFDS would import its module to "
                    "read the build; refusing. Rebuild the data set, or restore features.json "
                    "from a good copy"
                )
            pending.extend(value.values())
        elif isinstance(value, list):
            pending.extend(value)


@functools.lru_cache(maxsize=8)
def _open_build(build: str, texts: tuple[str, ...]):
    # `texts` keys the cache on the files' contents: a rebuild in place
    # (another build id, other shard lengths, other features) opens the new build.
    import tensorflow_datasets as tfds

    del texts
    return tfds.builder_from_directory(build)


@dataclasses.dataclass(frozen=True)
class SplitInfo:
    """A split's shard files (full paths, in order) and example counts."""

    name: str
    files: tuple[str, ...]
    file_examples: tuple[int, ...]
    # The split's bytes and the build's id (from the builders' metadata):
    # what tells two builds with the same file names apart.
    num_bytes: int = 0
    build_id: str = ""

    @property
    def identity(self) -> list:
        """What the split holds, as JSON: shard names and lengths, bytes, build id.

        A rebuilt split has another identity, so caches keyed on it (the
        evaluation's embeddings) go stale with the data, not with the
        folder's name.
        """
        shards = [
            [file_io.basename(f), n] for f, n in zip(self.files, self.file_examples, strict=True)
        ]
        return [shards, self.num_bytes, self.build_id]

    @property
    def num_examples(self) -> int:
        return sum(self.file_examples)

    @property
    def labeled(self) -> bool:
        return self.name in LABELED_SPLITS


def read_split_info(data_dir: str, split: str) -> SplitInfo:
    """A split's files and shard lengths, from the build's TFDS metadata.

    Args:
      data_dir: the build (see find_build).
      split: e.g. 'train', 'val', 'index', 'test'.

    Returns:
      The split's files in order with their example counts.

    Raises:
      DataFormatError: not a TFDS build, no such split (naming the ones
        there), or shard files listed in the metadata missing on disk.
    """
    builder = open_build(data_dir)
    build = str(builder.data_dir)
    splits = builder.info.splits
    if split not in splits:
        raise DataFormatError(f"{build}: no split {split!r}; the build has {sorted(splits.keys())}")
    info = splits[split]
    files = tuple(file_io.join(build, name) for name in info.filenames)
    missing = [f for f in files if not file_io.exists(f)]
    if missing:
        raise DataFormatError(
            f"{build}: {len(missing)} shard file(s) of split {split!r} listed in "
            f"dataset_info.json are missing, e.g. {missing[:3]}; rebuild the data set"
        )
    metadata = builder.info.metadata or {}
    return SplitInfo(
        split,
        files,
        tuple(int(n) for n in info.shard_lengths),
        int(info.num_bytes),
        str(metadata.get(BUILD_ID, "")),
    )


def read_num_classes(data_dir: str) -> int:
    """The number of classes: the `label` ClassLabel's, from features.json.

    Raises:
      DataFormatError: not a TFDS build, or no ClassLabel `label` feature.
    """
    builder = open_build(data_dir)
    features = builder.info.features
    label = features[LABEL] if LABEL in features.keys() else None  # noqa: SIM118 (not a dict)
    num_classes = getattr(label, "num_classes", None)
    if not num_classes:
        raise DataFormatError(
            f"{builder.data_dir}: no ClassLabel feature {LABEL!r} with a class count "
            f"(features: {sorted(features.keys())})"
        )
    return int(num_classes)


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


def read_label_map(data_dir: str) -> LabelMap:
    """Per-class landmark ids and example counts, from the build's metadata.

    The landmark ids are the `label` ClassLabel's names (label order); the
    counts are metadata.json's `class_counts`: count (training examples),
    num_clean (of them in train_clean.csv), train_val_count /
    train_val_clean (the class's examples in train + val, and how many are
    clean: the n_c of the GLR2020 class weights and the GLR2021 margins, see
    losses.py).

    They feed the class weights (w_c ~ 1/ln n_c) and the dynamic margins,
    which index them by label, so each must have exactly one entry per class
    and agree with the split lengths.

    Args:
      data_dir: the build.

    Returns:
      The label map.

    Raises:
      DataFormatError: no class_counts in the metadata, a missing or short
        column, landmark ids that are not integers, a count below 1,
        train_val counts below the train counts, a clean count outside
        [0, count], or totals that disagree with the train and val splits.
    """
    builder = open_build(data_dir)
    where = f"{builder.data_dir}/metadata.json"
    num_classes = read_num_classes(data_dir)
    counts_of = (builder.info.metadata or {}).get(CLASS_COUNTS)
    if not isinstance(counts_of, Mapping):
        raise DataFormatError(
            f"{where}: no {CLASS_COUNTS!r} (per-class example counts); build the data set "
            "with data_pipelines.build_dataset"
        )
    columns = {}
    for column in ("count", "num_clean", "train_val_count", "train_val_clean"):
        values = counts_of.get(column)
        if values is None or len(values) != num_classes:
            raise DataFormatError(
                f"{where}: {CLASS_COUNTS}.{column} has "
                f"{'no entries' if values is None else f'{len(values)} entries'} for "
                f"{num_classes} classes; rebuild the data set"
            )
        columns[column] = np.asarray(values, np.int64)
    counts = columns["count"]
    if counts.min() < 1:
        bad = int(np.argmin(counts))
        raise DataFormatError(
            f"{where}: label {bad} has count {counts[bad]}; every class needs >= 1"
        )
    _check_clean(where, "num_clean", columns["num_clean"], counts)
    train_val = columns["train_val_count"]
    below = np.flatnonzero(train_val < counts)
    if below.size:
        bad = int(below[0])
        raise DataFormatError(
            f"{where}: label {bad} has train_val_count {train_val[bad]} < count "
            f"{counts[bad]}; rebuild the data set"
        )
    _check_clean(where, "train_val_clean", columns["train_val_clean"], train_val)
    splits = builder.info.splits
    listed = {s: splits[s].num_examples for s in LABELED_SPLITS if s in splits}
    if int(counts.sum()) != listed.get("train", 0) or int(train_val.sum()) != sum(listed.values()):
        raise DataFormatError(
            f"{where}: the counts sum to {int(counts.sum())} (train) and "
            f"{int(train_val.sum())} (train + val) but the splits hold {listed}; "
            "rebuild the data set"
        )
    names = builder.info.features[LABEL].names
    try:
        landmark_ids = np.array([int(n) for n in names], np.int64)
    except ValueError:
        raise DataFormatError(
            f"{builder.data_dir}: the {LABEL!r} class names are not landmark ids (e.g. {names[:3]})"
        ) from None
    return LabelMap(
        landmark_ids, counts, columns["num_clean"], train_val, columns["train_val_clean"]
    )


def _check_clean(path: str, column: str, clean: np.ndarray, counts: np.ndarray) -> None:
    """Raises DataFormatError unless 0 <= clean <= counts per class."""
    bad_rows = np.flatnonzero((clean < 0) | (clean > counts))
    if bad_rows.size:
        bad = int(bad_rows[0])
        raise DataFormatError(
            f"{path}: label {bad} has {column} {clean[bad]}, outside [0, {counts[bad]}]"
        )
