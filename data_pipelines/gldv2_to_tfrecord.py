r"""Converts a GLDv2 split (CSV + image tree) into sharded TFRecords.

    python -m data_pipelines.gldv2_to_tfrecord --split=train \
        --csv=train.csv --clean_csv=train_clean.csv --images_dir=train/ \
        --output_dir=OUT --num_shards=500 --val_fraction=0.02 --seed=0
    python -m data_pipelines.gldv2_to_tfrecord --split=index \
        --csv=index.csv --images_dir=index/ --output_dir=OUT --num_shards=100

Shards are `<split>-00000-of-000NN.tfrecord` (train also writes `val-*`), so
every split of a data set shares one folder. Train relabels landmark ids to
contiguous labels (`label_map.csv`: label, landmark_id, count of training
examples, num_clean of them, and train_val_count / train_val_clean, the same
over train + val, i.e. every row of the CSV that was written: the n_c of the
class weights and margins) and marks `image/is_clean` from train_clean.csv.
Every run updates `dataset_info.json` (examples per split and per file,
number of classes).

Nothing is dropped silently: a missing or undecodable image stops the run with
its path, unless --skip_bad_images, which lists every skipped image in
`bad_images-<split>.csv` and in the summary. Grayscale, CMYK, palette and PNG
images are re-encoded as 3-channel JPEGs; RGB JPEGs are copied byte for byte.

Every path may be local or a URL (gs://...): the files go through
`landmark_jax.file_io`.
"""

from __future__ import annotations

import collections
import csv
import io
import os
import time
from collections.abc import Sequence

import numpy as np
from absl import app, flags

from data_pipelines import gldv2_csv, shard_plan, shard_writer, tfrecord_shard
from landmark_jax import data_format, entry_point_errors, file_io, tensorflow_setup

# nonlandmark: known non-landmark images (an id CSV, like index and test), the
# reference set of recognition's non-landmark penalty.
SPLITS = ("train", "index", "test", "nonlandmark")


def _load_examples(
    split: str,
    csv_path: str,
    images_dir: str,
    clean_csv: str | None,
    clean_only: bool,
    skip_bad_images: bool,
    clean_classes_only: bool = False,
) -> tuple[list[tfrecord_shard.Example], dict[int, int], list[tuple[str, str, str]]]:
    """Reads the CSVs, finds every image, and labels train examples.

    Returns:
      The examples, the map landmark_id -> label (empty for index/test), and
      the skipped images as (id, path, reason).
    """
    if split == "train":
        records = gldv2_csv.read_train_csv(csv_path)
    else:
        records = gldv2_csv.read_id_csv(csv_path)

    clean: dict[str, int] = {}
    if clean_csv:
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
        if clean_only:
            records = [r for r in records if r.image_id in clean]
        if clean_classes_only:  # GLDv2x: every image of the clean classes
            classes = set(clean.values())
            records = [r for r in records if r.landmark_id in classes]

    skipped: list[tuple[str, str, str]] = []
    located = []
    missing = []
    for r in records:
        path = gldv2_csv.find_image(images_dir, r.image_id)
        if path is None:
            expected = gldv2_csv.image_path_candidates(images_dir, r.image_id)[0]
            missing.append(r.image_id)
            skipped.append((r.image_id, expected, "missing file"))
        else:
            located.append((r, path))
    if missing and not skip_bad_images:
        expected = gldv2_csv.image_path_candidates(images_dir, missing[0])[0]
        raise FileNotFoundError(
            f"{len(missing)} image(s) listed in {csv_path} have no file under {images_dir}, "
            f"e.g. {missing[0]} (expected {expected}); pass --skip_bad_images to skip "
            "and list them"
        )

    label_of: dict[int, int] = {}
    if split == "train":
        landmark_ids = sorted({r.landmark_id for r, _ in located})
        label_of = {lm: label for label, lm in enumerate(landmark_ids)}
    examples = [
        tfrecord_shard.Example(
            image_id=r.image_id,
            path=path,
            label=label_of[r.landmark_id] if split == "train" else -1,
            landmark_id=r.landmark_id if split == "train" else -1,
            is_clean=int(r.image_id in clean) if clean_csv else 1,
        )
        for r, path in located
    ]
    return examples, label_of, skipped


def _finish_build(
    staged: shard_writer.StagedBuild,
    split: str,
    label_of: dict,
    results: list[tfrecord_shard.ShardResult],
    skipped: list,
    source: dict,
) -> tuple[dict, int | None, dict]:
    """Counts what the shards hold, writes label_map.csv and bad_images-*.csv
    beside them and commits the build.

    Returns:
      (dataset_info.json entries of the build's splits, number of classes
      (train) or None, the merged dataset_info.json).

    Raises:
      ValueError: a landmark lost all its training images to skipped images.
    """
    csv_path = source["csv"]
    # Count what was written, not what was planned: --skip_bad_images may have
    # dropped undecodable images inside the workers.
    info_splits: dict[str, dict] = {}
    train_counts: collections.Counter = collections.Counter()
    clean_counts: collections.Counter = collections.Counter()
    # Train + val per class: the counts over the whole CSV, as the GLR2020
    # notebooks compute n_c (held-out fold included; see losses.py).
    train_val_counts: collections.Counter = collections.Counter()
    train_val_clean: collections.Counter = collections.Counter()
    for r in results:
        name = file_io.basename(r.path).split("-")[0]
        entry = info_splits.setdefault(name, {"num_examples": 0, "num_clean": 0, "files": []})
        entry["num_examples"] += r.num_examples
        entry["num_clean"] += r.num_clean
        entry["files"].append(
            {"name": file_io.basename(r.path), "num_examples": r.num_examples, "sha256": r.sha256}
        )
        skipped += r.skipped
        if name == "train":
            train_counts.update(r.label_counts)
            clean_counts.update(r.clean_label_counts)
        if name in data_format.LABELED_SPLITS:
            train_val_counts.update(r.label_counts)
            train_val_clean.update(r.clean_label_counts)

    num_classes = len(label_of) if split == "train" else None
    if split == "train":
        empty = [lm for lm, label in label_of.items() if train_counts[label] == 0]
        if empty:
            raise ValueError(
                f"{len(empty)} landmark(s) lost all their training images to skipped "
                f"images, e.g. landmark_id {empty[0]}; fix or remove those rows of {csv_path}"
            )
        text = io.StringIO(newline="")
        w = csv.writer(text)
        w.writerow(data_format.LABEL_MAP_COLUMNS)
        for lm, label in sorted(label_of.items(), key=lambda kv: kv[1]):
            w.writerow(
                [
                    label,
                    lm,
                    train_counts[label],
                    clean_counts[label],
                    train_val_counts[label],
                    train_val_clean[label],
                ]
            )
        file_io.write_text(file_io.join(staged.path, data_format.LABEL_MAP), text.getvalue())

    if skipped:
        text = io.StringIO(newline="")
        w = csv.writer(text)
        w.writerow(["id", "path", "reason"])
        w.writerows(sorted(skipped))
        file_io.write_text(file_io.join(staged.path, f"bad_images-{split}.csv"), text.getvalue())

    source = {**source, "num_skipped": len(skipped)}
    owned = data_format.LABELED_SPLITS if split == "train" else (split,)
    info = staged.commit(owned, info_splits, num_classes, source, [f"bad_images-{split}.csv"])
    return info_splits, num_classes, info


def build_split(
    split: str,
    csv_path: str,
    images_dir: str,
    output_dir: str,
    num_shards: int,
    *,
    clean_csv: str | None = None,
    clean_only: bool = False,
    clean_classes_only: bool = False,
    val_fraction: float = 0.0,
    num_val_shards: int | None = None,
    seed: int = 0,
    skip_bad_images: bool = False,
    num_workers: int | None = None,
    jpeg_quality: int = 95,
) -> dict:
    """Converts one GLDv2 split to TFRecord shards in `output_dir`.

    Args:
      split: 'train', 'index', 'test' or 'nonlandmark'.
      csv_path: train.csv (id,url,landmark_id) or index.csv / test.csv (id).
      images_dir: the root of the split's `a/b/c/<id>.jpg` tree.
      output_dir: the data folder (shared by all splits of a data set); local
        or a URL (gs://; ram:// with num_workers <= 1 only).
      num_shards: number of shard files (train: of the training examples).
      clean_csv: train_clean.csv; marks `image/is_clean` (train only). Without
        it every train image counts as clean.
      clean_only: keep only the images listed in clean_csv (GLDv2-clean).
      clean_classes_only: keep every image (clean or not) of the classes in
        clean_csv (GLDv2x, GLR2021's set: 81,313 classes, their noisy images too).
      val_fraction: fraction of each class's clean images held out as `val`.
      num_val_shards: shard count for val; default scales with val_fraction.
      seed: seed of the validation split and the shard shuffle.
      skip_bad_images: skip (and list) missing and undecodable images instead
        of stopping.
      num_workers: processes writing shards; default min(num_shards, cores)
        (1 for a ram:// output_dir).
      jpeg_quality: quality of re-encoded (non-RGB-JPEG) images.

    Returns:
      A summary: examples and files per split, number of classes, clean
      examples, the skipped images and the seconds taken.

    Raises:
      ValueError: inconsistent arguments (flags that apply only to train,
        num_shards < 1, more shards than examples, num_workers > 1 with a
        ram:// output_dir...).
      GLDv2FormatError: a malformed CSV (the message names file and line).
      FileNotFoundError: images listed in the CSV with no file.
      tfrecord_shard.BadImageError: an undecodable image (names its path).
    """
    start = time.time()
    if split not in SPLITS:
        raise ValueError(f"--split={split!r}: expected one of {SPLITS}")
    if split != "train" and (clean_csv or clean_only or clean_classes_only or val_fraction):
        raise ValueError(
            "--clean_csv, --clean_only, --clean_classes_only and --val_fraction apply to "
            f"--split=train, not {split!r}"
        )
    for flag, value in (("clean_only", clean_only), ("clean_classes_only", clean_classes_only)):
        if value and not clean_csv:
            raise ValueError(f"--{flag} needs --clean_csv")
    if clean_only and clean_classes_only:
        raise ValueError("--clean_only and --clean_classes_only exclude each other")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"--val_fraction={val_fraction}: expected a value in [0, 1)")
    if num_shards < 1:
        raise ValueError(f"--num_shards={num_shards}: expected >= 1")
    shard_writer.check_num_workers(output_dir, num_workers)
    if not file_io.isdir(images_dir):
        raise FileNotFoundError(f"--images_dir={images_dir}: not a directory")

    examples, label_of, skipped = _load_examples(
        split, csv_path, images_dir, clean_csv, clean_only, skip_bad_images, clean_classes_only
    )
    rng = np.random.default_rng(seed)
    is_val = shard_plan.assign_val(examples, val_fraction, rng)
    if num_val_shards is None:
        num_val_shards = max(1, round(num_shards * val_fraction))
    num_train = int((~is_val).sum())
    if num_train < num_shards:
        raise ValueError(
            f"--num_shards={num_shards} is more than the {num_train} examples of {csv_path}"
        )
    plan = shard_plan.plan_shards(split, examples, is_val, num_shards, num_val_shards, rng)

    file_io.makedirs(output_dir)
    if num_workers is None:
        num_workers = shard_writer.default_num_workers(
            output_dir, min(len(plan), os.cpu_count() or 1)
        )
    # Written aside; the old split is replaced only once the new one is complete.
    with shard_writer.StagedBuild(output_dir, split) as staged:
        results = shard_writer.write_shards(
            staged.path, plan, skip_bad_images, num_workers, jpeg_quality
        )
        source = {
            "csv": shard_writer.source_path(csv_path),
            "clean_csv": shard_writer.source_path(clean_csv) if clean_csv else None,
            "clean_only": clean_only,
            "clean_classes_only": clean_classes_only,
            "val_fraction": val_fraction,
            "seed": seed,
        }
        info_splits, num_classes, info = _finish_build(
            staged, split, label_of, results, skipped, source
        )

    return {
        "split": split,
        "output_dir": output_dir,
        "num_classes": info["num_classes"],
        "splits": {
            k: {
                "num_examples": v["num_examples"],
                "num_clean": v["num_clean"],
                "num_files": len(v["files"]),
            }
            for k, v in info_splits.items()
        },
        "skipped": sorted(skipped),
        "seconds": round(time.time() - start, 1),
    }


def format_summary(summary: dict) -> str:
    """Renders build_split's summary for the console."""
    lines = [f"GLDv2 {summary['split']} -> {summary['output_dir']} ({summary['seconds']} s)"]
    for name, s in summary["splits"].items():
        lines.append(
            f"  {name:5s}: {s['num_examples']:>9,d} examples in {s['num_files']} files"
            + (f", {s['num_clean']:,d} clean" if summary["split"] == "train" else "")
        )
    if summary["split"] == "train":
        lines.append(f"  classes: {summary['num_classes']:,d}")
    if summary["skipped"]:
        lines.append(
            f"  skipped {len(summary['skipped'])} image(s) (bad_images-{summary['split']}.csv):"
        )
        lines += [f"    {i} {p}: {why}" for i, p, why in summary["skipped"][:20]]
    return "\n".join(lines)


FLAGS = flags.FLAGS


def define_flags() -> None:
    """Defines the command-line flags (only when run as a program: absl flags are
    global, and importing two tools into one process must not collide)."""
    flags.DEFINE_enum("split", None, list(SPLITS), "Which GLDv2 split the CSV describes.")
    flags.DEFINE_string("csv", None, "train.csv, index.csv or test.csv.")
    flags.DEFINE_string("clean_csv", None, "train_clean.csv (train only): marks image/is_clean.")
    flags.DEFINE_bool("clean_only", False, "Keep only the images of --clean_csv (GLDv2-clean).")
    flags.DEFINE_bool(
        "clean_classes_only", False, "Keep every image of the classes of --clean_csv (GLDv2x)."
    )
    flags.DEFINE_string("images_dir", None, "Root of the split's a/b/c/<id>.jpg image tree.")
    flags.DEFINE_string(
        "output_dir", None, "Data folder for shards, dataset_info.json, label_map.csv."
    )
    flags.DEFINE_integer("num_shards", None, "Number of shard files.")
    flags.DEFINE_float(
        "val_fraction", 0.0, "Fraction of each class's clean images held out as val."
    )
    flags.DEFINE_integer(
        "num_val_shards", None, "Shard files for val (default: scaled by fraction)."
    )
    flags.DEFINE_integer("seed", 0, "Seed of the validation split and the shard shuffle.")
    flags.DEFINE_bool("skip_bad_images", False, "Skip and list missing/undecodable images.")
    flags.DEFINE_integer("num_workers", None, "Writer processes (default: min(shards, cores)).")
    flags.DEFINE_integer("jpeg_quality", 95, "JPEG quality for re-encoded images.")


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    tensorflow_setup.hide_accelerators()
    summary = build_split(
        FLAGS.split,
        FLAGS.csv,
        FLAGS.images_dir,
        FLAGS.output_dir,
        FLAGS.num_shards,
        clean_csv=FLAGS.clean_csv,
        clean_only=FLAGS.clean_only,
        clean_classes_only=FLAGS.clean_classes_only,
        val_fraction=FLAGS.val_fraction,
        num_val_shards=FLAGS.num_val_shards,
        seed=FLAGS.seed,
        skip_bad_images=FLAGS.skip_bad_images,
        num_workers=FLAGS.num_workers,
        jpeg_quality=FLAGS.jpeg_quality,
    )
    print(format_summary(summary))


if __name__ == "__main__":
    define_flags()
    flags.mark_flags_as_required(["split", "csv", "images_dir", "output_dir", "num_shards"])
    entry_point_errors.run(main)
