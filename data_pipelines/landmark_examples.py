"""The examples of a GLDv2-layout build: which images, their labels, and the
per-class validation split of train.

Pure planning, no pixels: the CSVs are read, every image is located in the
`<split>/a/b/c/<id>.jpg` tree and train's landmark ids are relabelled to
contiguous labels. The TFDS builders (`gldv2_builder`, `demo_builder`) then
encode the images.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Sequence

import numpy as np

from data_pipelines import gldv2_csv
from landmark_jax.runtime import file_io

# How a build selects train.csv's rows (GLDv2 naming):
#   'all': every row, `is_clean` from train_clean.csv (GLDv2, 203,094 classes);
#   'clean': the rows of train_clean.csv only (GLDv2-clean, 81,313 classes);
#   'clean_classes': every row of the classes in train_clean.csv (GLDv2x,
#     GLR2021's set: 81,313 classes with their noisy images).
TRAIN_SELECTIONS = ("all", "clean", "clean_classes")


@dataclasses.dataclass(frozen=True)
class Example:
    """One image to write: id, file, contiguous label, landmark id, clean flag
    (label and landmark id -1 outside train)."""

    image_id: str
    path: str
    label: int
    landmark_id: int
    is_clean: int


@dataclasses.dataclass(frozen=True)
class SplitPlan:
    """A split's examples, the images that could not be found, and what its CSV lists."""

    examples: list[Example]
    label_of: dict[int, int]  # landmark_id -> label (train only)
    missing: list[tuple[str, str, str]]  # (id, expected path, reason)
    # Every row of the split's CSV, selected or not, with its line: what
    # gldv2_csv.check_disjoint compares across splits.
    listed: list[gldv2_csv.ImageRecord] = dataclasses.field(default_factory=list)


def plan_split(
    split: str,
    csv_path: str,
    images_dir: str,
    *,
    clean_csv: str | None = None,
    train_images: str = "all",
    skip_missing: bool = False,
) -> SplitPlan:
    """Reads a split's CSV(s), finds every image, and labels train examples.

    Args:
      split: 'train', or an id-only split ('index', 'test', 'nonlandmark').
      csv_path: train.csv (id,url,landmark_id) or an id CSV.
      images_dir: the root of the split's `a/b/c/<id>.jpg` tree.
      clean_csv: train_clean.csv, required for train: marks `is_clean` (a
        build without it would call every image clean, and the not-clean
        loss weight would do nothing).
      train_images: one of TRAIN_SELECTIONS (train only).
      skip_missing: leave out (and list) images with no file instead of
        raising.

    Returns:
      The plan: examples in CSV order, landmark_id -> label, missing images.

    Raises:
      GLDv2FormatError: a malformed CSV, or train_clean.csv listing an id
        that train.csv lacks or under another landmark.
      ValueError: train without clean_csv, or an unknown selection.
      FileNotFoundError: images with no file (unless skip_missing); names
        the CSV, the count and the first expected path.
    """
    if train_images not in TRAIN_SELECTIONS:
        raise ValueError(f"train_images={train_images!r}: expected one of {TRAIN_SELECTIONS}")
    if split == "train" and not clean_csv:
        raise ValueError(
            f"{csv_path}: train needs train_clean.csv to mark its clean images "
            f"(train_images={train_images!r})"
        )
    records = (
        gldv2_csv.read_train_csv(csv_path) if split == "train" else gldv2_csv.read_id_csv(csv_path)
    )
    csv_records = records
    clean: dict[str, int] = {}
    if split == "train" and clean_csv:
        clean = gldv2_csv.read_train_clean_csv(clean_csv)
        by_id = {r.image_id: r.landmark_id for r in records}
        unknown = [i for i in clean if i not in by_id]
        if unknown:
            raise gldv2_csv.GLDv2FormatError(
                f"{clean_csv}: {len(unknown)} image id(s) not in {csv_path}, e.g. {unknown[:5]}"
            )
        moved = [i for i, lm in clean.items() if by_id[i] != lm]
        if moved:
            i = moved[0]
            raise gldv2_csv.GLDv2FormatError(
                f"{clean_csv}: {len(moved)} image(s) under a different landmark than in "
                f"{csv_path}, e.g. {i}: {clean[i]} vs {by_id[i]}"
            )
        if train_images == "clean":
            records = [r for r in records if r.image_id in clean]
        elif train_images == "clean_classes":
            classes = set(clean.values())
            records = [r for r in records if r.landmark_id in classes]

    located, missing = [], []
    listed = gldv2_csv.list_images(images_dir)
    for r in records:
        path = gldv2_csv.find_image(images_dir, r.image_id, listed)
        if path is None:
            expected = gldv2_csv.image_path_candidates(images_dir, r.image_id)[0]
            missing.append((r.image_id, expected, "missing file"))
        else:
            located.append((r, path))
    if missing and not skip_missing:
        raise FileNotFoundError(
            f"{len(missing)} image(s) listed in {csv_path} have no file under {images_dir}, "
            f"e.g. {missing[0][0]} (expected {missing[0][1]}); pass --skip_bad_images to "
            "skip and list them"
        )

    label_of: dict[int, int] = {}
    if split == "train":
        landmark_ids = sorted({r.landmark_id for r, _ in located})
        label_of = {lm: label for label, lm in enumerate(landmark_ids)}
    examples = [
        Example(
            image_id=r.image_id,
            path=path,
            label=label_of[r.landmark_id] if split == "train" else -1,
            landmark_id=r.landmark_id if split == "train" else -1,
            is_clean=int(r.image_id in clean),
        )
        for r, path in located
    ]
    return SplitPlan(examples, label_of, missing, csv_records)


def assign_val(
    examples: Sequence[Example], val_fraction: float, rng: np.random.Generator
) -> np.ndarray:
    """Picks validation examples per class, never a class's last training image.

    Validation images come from the clean images of each class. A class with n
    clean images gives floor(f * n + u) of them (u uniform in [0, 1), so the
    expected fraction is f even for small classes), capped at n - 1 so every
    class keeps a clean image for training.

    Returns:
      bool [len(examples)]: True for the validation examples.
    """
    is_val = np.zeros(len(examples), bool)
    if val_fraction <= 0:
        return is_val
    by_label: dict[int, list[int]] = collections.defaultdict(list)
    for i, ex in enumerate(examples):
        if ex.is_clean:
            by_label[ex.label].append(i)
    for label in sorted(by_label):
        members = by_label[label]
        n_val = min(int(np.floor(val_fraction * len(members) + rng.random())), len(members) - 1)
        if n_val > 0:
            is_val[rng.choice(members, size=n_val, replace=False)] = True
    return is_val


def class_counts(examples: Sequence[Example], num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(examples, clean examples) per label, int64 [num_classes] each."""
    labels = np.array([ex.label for ex in examples], np.int64)
    clean = np.array([ex.is_clean for ex in examples], np.int64)
    return (
        np.bincount(labels, minlength=num_classes).astype(np.int64),
        np.bincount(labels, weights=clean, minlength=num_classes).astype(np.int64),
    )


def describe_path(path: str) -> str:
    """How the build's metadata records an input: absolute if local, a URL as is."""
    import os

    return path if file_io.is_url(path) else os.path.abspath(path)
