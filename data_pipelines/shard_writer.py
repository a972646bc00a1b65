"""Writes a split's shards into a data folder, shared by the data builders.

Removal of a split's earlier shards (named by `data_format.shard_name`),
parallel writing (worker processes run tfrecord_shard), and the merge of a
run's splits into `dataset_info.json`, which the input pipeline checks the
shards on disk against. Every path may be local or a URL (gs://, ram://):
the files go through `landmark_jax.file_io`.
"""

from __future__ import annotations

import json
import multiprocessing
import os
from collections.abc import Sequence

from data_pipelines import tfrecord_shard
from landmark_jax import data_format, file_io

# TensorFlow's ram:// filesystem lives in one process's memory: what a worker
# process writes there is lost with the worker.
_IN_PROCESS_SCHEMES = ("ram",)


def check_num_workers(path: str, num_workers: int | None, flag: str = "output_dir") -> None:
    """Refuses worker processes for a folder only this process can see (ram://).

    Raises:
      ValueError: num_workers > 1 and `path` is in-process memory, naming it.
    """
    kind = file_io.scheme(path)
    if num_workers is not None and num_workers > 1 and kind in _IN_PROCESS_SCHEMES:
        raise ValueError(
            f"--{flag}={path}: {kind}:// is TensorFlow's in-process memory, which worker "
            f"processes cannot write into (num_workers={num_workers}); use num_workers=1"
        )


def default_num_workers(path: str, wanted: int) -> int:
    """`wanted`, or 1 for a folder only this process can see (ram://)."""
    return 1 if file_io.scheme(path) in _IN_PROCESS_SCHEMES else wanted


def source_path(path: str) -> str:
    """How dataset_info.json records an input: absolute if local, a URL as is."""
    return path if file_io.is_url(path) else os.path.abspath(path)


def remove_old_shards(output_dir: str, names: Sequence[str]) -> None:
    """Deletes earlier shards of the same splits, which a glob would pick up."""
    patterns = {data_format.shard_pattern(n.split("-")[0]) for n in names}
    # The readers' glob itself (data_format.read_split_info), which also lists
    # only the shards' prefix in a bucket, not the whole folder.
    for pattern in sorted(patterns):
        for path in file_io.glob(file_io.join(output_dir, pattern)):
            file_io.remove(path)


def write_shards(
    output_dir: str,
    plan: Sequence[tuple[str, list[tfrecord_shard.Example]]],
    skip_bad_images: bool,
    num_workers: int,
    jpeg_quality: int,
) -> list[tfrecord_shard.ShardResult]:
    """Writes the shards, in parallel processes when num_workers > 1."""
    from tqdm import tqdm

    jobs = [
        tfrecord_shard.ShardJob(
            file_io.join(output_dir, name), examples, skip_bad_images, jpeg_quality
        )
        for name, examples in plan
    ]
    total = sum(len(j.examples) for j in jobs)
    results = []
    with tqdm(total=total, unit="img", desc="writing shards") as progress:
        if num_workers <= 1:
            for job in jobs:
                results.append(tfrecord_shard.write_shard(job))
                progress.update(len(job.examples))
        else:
            # spawn, not fork: TensorFlow's runtime does not survive a fork.
            ctx = multiprocessing.get_context("spawn")
            with ctx.Pool(num_workers) as pool:
                for result in pool.imap_unordered(tfrecord_shard.write_shard, jobs):
                    results.append(result)
                    progress.update(result.num_examples + len(result.skipped))
    return sorted(results, key=lambda r: r.path)


def update_dataset_info(output_dir: str, split: str, info_splits: dict, num_classes, source):
    """Merges this run's splits into dataset_info.json (other splits are kept)."""
    path = file_io.join(output_dir, data_format.DATASET_INFO)
    info = {"num_classes": None, "splits": {}, "sources": {}}
    if file_io.exists(path):
        info.update(file_io.read_json(path))
    if split == "train":
        info["num_classes"] = num_classes
        info["splits"].pop("val", None)
    info["splits"].update(info_splits)
    info["sources"][split] = source
    info["features"] = {
        "image/encoded": "JPEG bytes, 3 channels",
        "image/id": "bytes",
        "image/class/label": "int64, contiguous 0..num_classes-1 (train, val)",
        "image/class/landmark_id": "int64, the GLDv2 landmark id (train, val)",
        "image/is_clean": "int64, 1 if listed in train_clean.csv (train, val)",
    }
    # write_text replaces the file whole (written aside, then renamed locally).
    file_io.write_text(path, json.dumps(info, indent=2, sort_keys=True))
    return info
