"""Writes a small synthetic landmark data set in the exact GLDv2 layout.

    python -m data_pipelines.make_demo_dataset --output_dir=demo_data/raw

Every landmark is a procedurally drawn scene (see `synthetic_scenes`) and its
images are photographs of it from random viewpoints, in random light, partly
occluded. The splits follow GLDv2:

- train: long-tailed classes (2 to `max_images_per_landmark` clean images
  each), listed in train.csv; the clean images also in train_clean.csv. The
  rest of train.csv is noise, as in the web-mined GLDv2 train set: hard but
  correctly labelled photographs, photographs of another train landmark, and
  non-landmark images, all carrying some train landmark's id.
- index: photographs of the index landmarks, which are disjoint from the train
  landmarks, plus non-landmark images.
- test: retrieval queries (1 to 3 photographs of each of three quarters of the
  index landmarks), recognition images (photographs of train landmarks, 3 for
  every 4 train landmarks, each of a landmark drawn in proportion to its
  clean train images: the train set's long tail) and non-landmark
  distractors.
- nonlandmark: known non-landmark photographs of scenes of their own, listed
  in nonlandmark.csv: the reference set of recognition's non-landmark penalty.

`demo_layout` decides where the images go and what the CSV and solution files list.

The same seed gives byte-identical CSVs and identical pixels, whatever the
number of worker processes.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import multiprocessing
import os
import time
from collections.abc import Sequence

import numpy as np
from absl import app, flags

from data_pipelines import demo_layout, synthetic_photos, worker_processes
from landmark_jax import entry_point_errors, file_io

# GLDv2 train landmark ids run up to 203,093; demo ids are drawn from the same
# range, non-contiguous, so that builders must map them to labels 0..C-1.
_LANDMARK_ID_RANGE = 203_094
# Composition of the noisy (not clean) train images: correctly labelled but
# hard photographs, photographs of another landmark, non-landmark images.
_NOISE_MIX = {"correct": 0.5, "mislabelled": 0.3, "distractor": 0.2}
_HARD_DIFFICULTY = 1.8
_QUERIED_INDEX_FRACTION = 0.75
_INDEX_DISTRACTOR_FRACTION = 0.2
_RECOGNITION_IMAGES_PER_TRAIN_LANDMARK = 0.75
_TEST_DISTRACTOR_FRACTION = 0.5
_PUBLIC_FRACTION = 0.3
# Random-stream namespaces, so no two generators share entropy.
_PLAN_STREAM, _LANDMARK_STREAM, _DISTRACTOR_STREAM, _PHOTO_STREAM = range(4)


@dataclasses.dataclass
class _Photo:
    """One planned image: where it goes, what it shows and how it is labelled."""

    split: str
    scene: tuple[str, int]  # ("landmark", landmark index) or ("distractor", index)
    difficulty: float = 1.0
    label: int | None = None  # train: the (possibly wrong) landmark id it is filed under
    clean: bool = False
    noise: str | None = None  # train noise kind, see _NOISE_MIX
    test_role: str | None = None  # "query", "recognition" or "distractor"
    truth: int | None = None  # landmark id actually shown (index and test)
    image_id: str = ""
    usage: str = ""


def long_tailed_counts(num_classes: int, max_count: int, rng: np.random.Generator) -> np.ndarray:
    """Class sizes from 2 up to `max_count`, few large classes and many small ones.

    The i-th of n sizes is 2 + (max_count - 2) * (1 - i / n)^3, rounded: the
    largest is max_count, the mean about 2 + (max_count - 2) / 4, and a good
    share of the classes have 2 or 3 images.

    Args:
      num_classes: how many sizes.
      max_count: the largest size, >= 2.
      rng: shuffles which class gets which size.

    Returns:
      int64 array of `num_classes` sizes, each in [2, max_count].
    """
    q = np.arange(num_classes) / num_classes
    counts = 2 + np.floor((max_count - 2) * (1 - q) ** 3 + 0.5).astype(np.int64)
    return rng.permutation(counts)


def _unique_hex_ids(rng: np.random.Generator, n: int) -> list[str]:
    """`n` distinct ids of 16 lowercase hex characters, like GLDv2 ids."""
    ids: list[str] = []
    seen: set[str] = set()
    while len(ids) < n:
        candidate = rng.bytes(8).hex()
        if candidate not in seen:
            seen.add(candidate)
            ids.append(candidate)
    return ids


def _split_usage(photos: Sequence[_Photo], rng: np.random.Generator) -> None:
    """Marks about 30% Public and the rest Private, with both present when n >= 2."""
    n = len(photos)
    num_public = max(1, round(_PUBLIC_FRACTION * n)) if n >= 2 else 0
    order = rng.permutation(n)
    for rank, i in enumerate(order):
        photos[i].usage = "Public" if rank < num_public else "Private"


def _plan(
    num_landmarks: int,
    num_index_landmarks: int,
    max_images_per_landmark: int,
    noisy_fraction: float,
    num_non_landmark_references: int,
    rng: np.random.Generator,
) -> list[_Photo]:
    """Decides every image of the data set, in a deterministic order."""
    total_landmarks = num_landmarks + num_index_landmarks
    # Landmarks 0..num_landmarks-1 are train landmarks, the rest index landmarks.
    landmark_ids = rng.choice(_LANDMARK_ID_RANGE, size=total_landmarks, replace=False)
    photos: list[_Photo] = []
    distractors = 0

    def distractor(split: str, **fields) -> _Photo:
        nonlocal distractors
        distractors += 1
        return _Photo(split, ("distractor", distractors - 1), **fields)

    clean_counts = long_tailed_counts(num_landmarks, max_images_per_landmark, rng)
    for lm, count in enumerate(clean_counts):
        for _ in range(count):
            photos.append(
                _Photo("train", ("landmark", lm), label=int(landmark_ids[lm]), clean=True)
            )
    num_noisy = round(noisy_fraction / (1 - noisy_fraction) * int(clean_counts.sum()))
    kinds = list(_NOISE_MIX)
    kind_counts = [math.floor(_NOISE_MIX[k] * num_noisy) for k in kinds]
    kind_counts[0] += num_noisy - sum(kind_counts)
    # Noise lands on classes in proportion to their size, as with web-mined labels.
    filed_under = rng.choice(num_landmarks, size=num_noisy, p=clean_counts / clean_counts.sum())
    filed = iter(filed_under.tolist())
    for kind, count in zip(kinds, kind_counts, strict=True):
        for _ in range(count):
            lm = next(filed)
            fields = dict(label=int(landmark_ids[lm]), noise=kind)
            if kind == "correct":
                photos.append(
                    _Photo("train", ("landmark", lm), difficulty=_HARD_DIFFICULTY, **fields)
                )
            elif kind == "mislabelled":
                other = (lm + 1 + int(rng.integers(num_landmarks - 1))) % num_landmarks
                photos.append(_Photo("train", ("landmark", other), **fields))
            else:
                photos.append(distractor("train", **fields))

    index_lms = np.arange(num_landmarks, total_landmarks)
    index_counts = long_tailed_counts(
        num_index_landmarks, max(2, max_images_per_landmark // 4), rng
    )
    for lm, count in zip(index_lms, index_counts, strict=True):
        for _ in range(count):
            photos.append(_Photo("index", ("landmark", int(lm)), truth=int(landmark_ids[lm])))
    num_index_distractors = max(1, round(_INDEX_DISTRACTOR_FRACTION * int(index_counts.sum())))
    photos.extend(distractor("index") for _ in range(num_index_distractors))

    queried = rng.permutation(index_lms)[: max(1, round(_QUERIED_INDEX_FRACTION * len(index_lms)))]
    test: dict[str, list[_Photo]] = collections.defaultdict(list)

    def test_photo(role: str, lm: int) -> _Photo:
        return _Photo("test", ("landmark", lm), test_role=role, truth=int(landmark_ids[lm]))

    for lm in sorted(int(x) for x in queried):
        test["query"].extend(test_photo("query", lm) for _ in range(int(rng.integers(1, 4))))
    # A train landmark is photographed again as often as it was before: the
    # recognition images follow the train set's long tail (drawn in
    # proportion to each landmark's clean train images), not one or two per
    # landmark whatever its size.
    num_recognition = max(1, round(_RECOGNITION_IMAGES_PER_TRAIN_LANDMARK * num_landmarks))
    drawn = rng.choice(num_landmarks, size=num_recognition, p=clean_counts / clean_counts.sum())
    test["recognition"] = [test_photo("recognition", lm) for lm in sorted(drawn.tolist())]
    num_test_distractors = max(
        1, round(_TEST_DISTRACTOR_FRACTION * (len(test["query"]) + len(test["recognition"])))
    )
    test["distractor"] = [
        distractor("test", test_role="distractor") for _ in range(num_test_distractors)
    ]
    for role in ("query", "recognition", "distractor"):
        _split_usage(test[role], rng)
        photos.extend(test[role])
    # Last, and without drawing from rng: the other splits do not depend on
    # how many reference images there are.
    photos.extend(distractor("nonlandmark") for _ in range(num_non_landmark_references))

    for photo, image_id in zip(photos, _unique_hex_ids(rng, len(photos)), strict=True):
        photo.image_id = image_id
    return photos


def _jobs(
    photos: Sequence[_Photo], output_dir: str, seed: int, image_size: int
) -> list[synthetic_photos.PhotoJob]:
    """Groups photos by scene so that each worker draws a scene once."""
    by_scene: dict[tuple[str, int], list[tuple[str, tuple[int, ...], float]]] = (
        collections.defaultdict(list)
    )
    for serial, photo in enumerate(photos):
        path = demo_layout.image_path(file_io.join(output_dir, photo.split), photo.image_id)
        by_scene[photo.scene].append((path, (seed, _PHOTO_STREAM, serial), photo.difficulty))
    jobs = []
    for (kind, index), items in by_scene.items():
        stream = _LANDMARK_STREAM if kind == "landmark" else _DISTRACTOR_STREAM
        jobs.append(
            synthetic_photos.PhotoJob(
                scene_seed=(seed, stream, index),
                is_landmark=kind == "landmark",
                photos=tuple(items),
                max_side=image_size,
            )
        )
    # Largest first, so that the pool does not end waiting on one big class.
    jobs.sort(key=lambda job: -len(job.photos))
    return jobs


def _render(jobs: Sequence[synthetic_photos.PhotoJob], num_workers: int) -> int:
    if num_workers <= 1:
        return sum(synthetic_photos.render_job(job) for job in jobs)
    # spawn, not fork: callers (tests, notebooks) may have started jax or TF
    # threads, which fork does not survive safely.
    with multiprocessing.get_context("spawn").Pool(num_workers) as pool:
        return sum(pool.imap_unordered(synthetic_photos.render_job, jobs))


def _check_arguments(
    num_landmarks: int,
    num_index_landmarks: int,
    max_images_per_landmark: int,
    noisy_fraction: float,
    num_non_landmark_references: int,
    image_size: int,
    seed: int,
    num_workers: int | None,
) -> None:
    problems = []
    if num_non_landmark_references < 0:
        problems.append(
            f"num_non_landmark_references must be >= 0, not {num_non_landmark_references}"
        )
    if num_landmarks < 2:
        problems.append(f"num_landmarks must be >= 2 (got {num_landmarks})")
    if num_index_landmarks < 2:
        problems.append(f"num_index_landmarks must be >= 2 (got {num_index_landmarks})")
    if max_images_per_landmark < 2:
        problems.append(
            f"max_images_per_landmark must be >= 2, every class needs 2 clean images "
            f"(got {max_images_per_landmark})"
        )
    if not 0.0 <= noisy_fraction < 1.0:
        problems.append(f"noisy_fraction must be in [0, 1) (got {noisy_fraction})")
    if not 32 <= image_size <= 1024:
        problems.append(f"image_size must be in [32, 1024] (got {image_size})")
    if seed < 0:
        problems.append(f"seed must be >= 0 (got {seed})")
    if num_workers is not None and num_workers < 0:
        problems.append(f"num_workers must be >= 0 (got {num_workers})")
    if problems:
        raise ValueError("; ".join(problems))


def make_demo_dataset(
    output_dir: str,
    num_landmarks: int = 80,
    num_index_landmarks: int = 140,
    max_images_per_landmark: int = 80,
    noisy_fraction: float = 0.3,
    num_non_landmark_references: int = 200,
    image_size: int = 128,
    seed: int = 0,
    num_workers: int | None = None,
    overwrite: bool = False,
) -> dict[str, int | float | str]:
    """Generates the synthetic GLDv2-layout data set.

    Args:
      output_dir: where to write the CSVs and the `train/`, `index/` and
        `test/` image trees; created if missing. A local folder or a URL
        (gs://; ram:// with num_workers <= 1 only).
      num_landmarks: train landmarks (classes).
      num_index_landmarks: index landmarks, disjoint from the train ones.
      max_images_per_landmark: clean images of the largest train class; the
        largest index landmark has a quarter of that (at least 2).
      noisy_fraction: fraction of train.csv that is not in train_clean.csv.
      num_non_landmark_references: images of the nonlandmark split (0: none;
        its CSV is then empty).
      image_size: longest side of the images, in pixels; each image's longest
        side is between 3/4 of it and all of it.
      seed: the data set is a function of the seed and the other arguments.
      num_workers: rendering processes; None for min(4, CPU count) (1 for a
        ram:// output_dir), 0 or 1 to render in this process.
      overwrite: replace an earlier data set in a non-empty output_dir.

    Returns:
      The summary: counts per split and per kind of image, the number of
      classes, the clean fraction and the seconds taken.

    Raises:
      ValueError: an argument out of range, or num_workers > 1 with a ram://
        output_dir (worker processes cannot write into this one's memory).
      FileExistsError: output_dir is not empty and overwrite is False.
      NotADirectoryError: output_dir is a file.
    """
    _check_arguments(
        num_landmarks,
        num_index_landmarks,
        max_images_per_landmark,
        noisy_fraction,
        num_non_landmark_references,
        image_size,
        seed,
        num_workers,
    )
    # The images are written by worker processes: not into in-process ram://.
    worker_processes.check_num_workers(output_dir, num_workers)
    start = time.perf_counter()
    demo_layout.prepare_output_dir(output_dir, overwrite)
    rng = np.random.default_rng((seed, _PLAN_STREAM))
    photos = _plan(
        num_landmarks,
        num_index_landmarks,
        max_images_per_landmark,
        noisy_fraction,
        num_non_landmark_references,
        rng,
    )
    if num_workers is None:
        num_workers = worker_processes.default_num_workers(output_dir, min(4, os.cpu_count() or 1))
    written = _render(_jobs(photos, output_dir, seed, image_size), num_workers)
    # The CSVs come last, so a data set with CSVs is a complete one.
    demo_layout.write_csvs(output_dir, photos)

    train = [p for p in photos if p.split == "train"]
    test = [p for p in photos if p.split == "test"]
    clean_per_class = collections.Counter(p.label for p in train if p.clean)
    noise = collections.Counter(p.noise for p in train if not p.clean)
    roles = collections.Counter(p.test_role for p in test)
    summary: dict[str, int | float | str] = {
        "output_dir": output_dir,
        "seed": seed,
        "total_images": written,
        "train_images": len(train),
        "train_landmarks": len(clean_per_class),
        "train_clean_images": sum(clean_per_class.values()),
        "train_noisy_correct": noise["correct"],
        "train_noisy_mislabelled": noise["mislabelled"],
        "train_noisy_distractor": noise["distractor"],
        "clean_fraction": round(sum(clean_per_class.values()) / len(train), 4),
        "min_clean_per_landmark": min(clean_per_class.values()),
        "max_clean_per_landmark": max(clean_per_class.values()),
        "index_images": sum(p.split == "index" for p in photos),
        "index_landmarks": num_index_landmarks,
        "index_distractors": sum(p.split == "index" and p.truth is None for p in photos),
        "test_images": len(test),
        "test_queries": roles["query"],
        "test_queried_landmarks": len({p.truth for p in test if p.test_role == "query"}),
        "test_recognition": roles["recognition"],
        "test_distractors": roles["distractor"],
        "nonlandmark_images": sum(p.split == "nonlandmark" for p in photos),
        "seconds": round(time.perf_counter() - start, 2),
    }
    return summary


def format_summary(summary: dict[str, int | float | str]) -> str:
    """A few human-readable lines for a `make_demo_dataset` summary.

    Args:
      summary: what `make_demo_dataset` returned.

    Returns:
      The text, without a trailing newline.
    """
    s = summary
    return "\n".join(
        [
            f"demo data set in {s['output_dir']} (seed {s['seed']}): "
            f"{s['total_images']} images in {s['seconds']} s",
            f"  train: {s['train_images']} images, {s['train_landmarks']} landmarks, "
            f"{s['train_clean_images']} clean ({s['clean_fraction']:.0%}; "
            f"{s['min_clean_per_landmark']}-{s['max_clean_per_landmark']} per landmark); "
            f"noisy: {s['train_noisy_correct']} hard, {s['train_noisy_mislabelled']} "
            f"mislabelled, {s['train_noisy_distractor']} non-landmark",
            f"  index: {s['index_images']} images, {s['index_landmarks']} landmarks, "
            f"{s['index_distractors']} non-landmark",
            f"  test: {s['test_images']} images: {s['test_queries']} retrieval queries of "
            f"{s['test_queried_landmarks']} index landmarks, {s['test_recognition']} of train "
            f"landmarks, {s['test_distractors']} non-landmark",
            f"  nonlandmark: {s['nonlandmark_images']} known non-landmark images",
        ]
    )


def define_flags() -> None:
    """Defines the command-line flags (only when run as a program: absl flags are
    global, and importing two tools into one process must not collide)."""
    flags.DEFINE_string("output_dir", None, "Folder to write the data set to.")
    flags.DEFINE_integer("num_landmarks", 80, "Train landmarks (classes).")
    flags.DEFINE_integer(
        "num_index_landmarks", 140, "Index landmarks, disjoint from the train landmarks."
    )
    flags.DEFINE_integer("max_images_per_landmark", 80, "Clean images of the largest train class.")
    flags.DEFINE_float("noisy_fraction", 0.3, "Fraction of train.csv not in train_clean.csv.")
    flags.DEFINE_integer(
        "num_non_landmark_references", 200, "Images of the nonlandmark (reference) split."
    )
    flags.DEFINE_integer("image_size", 128, "Longest image side, in pixels.")
    flags.DEFINE_integer("seed", 0, "Random seed; same seed, same data set.")
    flags.DEFINE_integer(
        "num_workers", None, "Rendering processes (default min(4, CPUs); 1: no pool)."
    )
    flags.DEFINE_boolean(
        "overwrite", False, "Replace an earlier data set in a non-empty --output_dir."
    )
    flags.mark_flag_as_required("output_dir")


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    summary = make_demo_dataset(
        flags.FLAGS.output_dir,
        num_landmarks=flags.FLAGS.num_landmarks,
        num_index_landmarks=flags.FLAGS.num_index_landmarks,
        max_images_per_landmark=flags.FLAGS.max_images_per_landmark,
        noisy_fraction=flags.FLAGS.noisy_fraction,
        num_non_landmark_references=flags.FLAGS.num_non_landmark_references,
        image_size=flags.FLAGS.image_size,
        seed=flags.FLAGS.seed,
        num_workers=flags.FLAGS.num_workers,
        overwrite=flags.FLAGS.overwrite,
    )
    print(format_summary(summary))


if __name__ == "__main__":
    define_flags()
    entry_point_errors.run(main)
