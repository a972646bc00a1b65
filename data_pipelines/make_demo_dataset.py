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

`demo_plan` decides which images there are; `demo_layout` where they go and
what the CSV and solution files list.

The same seed gives byte-identical CSVs and identical pixels, whatever the
number of worker processes.
"""

from __future__ import annotations

import collections
import multiprocessing
import os
import time
from collections.abc import Sequence

import numpy as np
from absl import flags

from data_pipelines import demo_layout, demo_plan, synthetic_photos, worker_processes
from landmark_jax.runtime import entry_point_errors, file_io

# Random-stream namespaces, so no two generators share entropy.
_PLAN_STREAM, _LANDMARK_STREAM, _DISTRACTOR_STREAM, _PHOTO_STREAM = range(4)


def _jobs(
    photos: Sequence[demo_plan.Photo], output_dir: str, seed: int, image_size: int
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
    photos = demo_plan.plan_photos(
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
    entry_point_errors.refuse_arguments(argv)
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
