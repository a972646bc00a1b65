"""Writes a split's shards into a data folder, shared by the data builders.

Removal of a split's earlier shards (named by `data_format.shard_name`),
parallel writing (worker processes run tfrecord_shard), and the merge of a
run's splits into `dataset_info.json`, which the input pipeline checks the
shards on disk against.
"""

from __future__ import annotations

import fnmatch
import json
import multiprocessing
import os
from collections.abc import Sequence

from data_pipelines import tfrecord_shard
from landmark_jax import data_format


def remove_old_shards(output_dir: str, names: Sequence[str]) -> None:
    """Deletes earlier shards of the same splits, which a glob would pick up."""
    patterns = {data_format.shard_pattern(n.split("-")[0]) for n in names}
    for f in os.listdir(output_dir):
        if any(fnmatch.fnmatchcase(f, p) for p in patterns):
            os.remove(os.path.join(output_dir, f))


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
            os.path.join(output_dir, name), examples, skip_bad_images, jpeg_quality
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
    path = os.path.join(output_dir, data_format.DATASET_INFO)
    info = {"num_classes": None, "splits": {}, "sources": {}}
    if os.path.exists(path):
        with open(path) as f:
            info.update(json.load(f))
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
    with open(path + ".tmp", "w") as f:
        json.dump(info, f, indent=2, sort_keys=True)
    os.replace(path + ".tmp", path)
    return info
