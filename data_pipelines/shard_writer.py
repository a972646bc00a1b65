"""Writes a split's shards into a data folder, shared by the data builders.

Parallel writing (worker processes run tfrecord_shard) into a staging
folder, and the swap of a complete build for the split's earlier shards
(named by `data_format.shard_name`) with the merge of its splits into
`dataset_info.json`, which the input pipeline checks the shards on disk
against: a failed build leaves the previous one intact, and builds of
different splits may run in parallel into one folder. Every path may be local or a URL (gs://, ram://):
the files go through `landmark_jax.file_io`.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import uuid
from collections.abc import Sequence

from data_pipelines import tfrecord_shard
from landmark_jax import data_format, file_io, file_lease

# TensorFlow's ram:// filesystem lives in one process's memory: what a worker
# process writes there is lost with the worker.
_IN_PROCESS_SCHEMES = ("ram",)
# A build's files are written under `.staging-<split>-<random>/` first.
STAGING_PREFIX = ".staging-"
# Held while a build swaps its files in and merges dataset_info.json.
DATASET_INFO_LOCK = ".dataset_info.lock"


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


def _update_dataset_info(
    output_dir: str, owned: Sequence[str], info_splits: dict, num_classes, source, source_key: str
) -> dict:
    """Merges a build's splits into dataset_info.json (the caller holds its lock)."""
    path = file_io.join(output_dir, data_format.DATASET_INFO)
    info = {"num_classes": None, "splits": {}, "sources": {}}
    if file_io.exists(path):
        info.update(file_io.read_json(path))
    for name in owned:
        info["splits"].pop(name, None)  # e.g. val, when a train rebuild has none
    if "train" in owned:
        info["num_classes"] = num_classes
    info["splits"].update(info_splits)
    info["sources"][source_key] = source
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


class StagedBuild:
    """A build's files, written aside and moved into the data folder only when complete.

    Everything a build writes (shards, label_map.csv, bad_images-*.csv...)
    goes to `path`, a hidden folder inside the data folder that no reader
    globs. `commit` then, holding the data folder's lock, deletes the
    splits' old shards (all of them: `val-*` too when a train rebuild has no
    validation split), moves the new files in and merges dataset_info.json.
    A build that fails before its commit leaves the data folder as it was:
    the staging folder is deleted on the way out, whatever the error.
    """

    def __init__(self, output_dir: str, build: str):
        self.output_dir = output_dir
        self.path = file_io.join(output_dir, f"{STAGING_PREFIX}{build}-{uuid.uuid4().hex[:8]}")
        self._build = build

    def __enter__(self) -> StagedBuild:
        # Leftovers of a build of the same split that was killed.
        for old in file_io.glob(file_io.join(self.output_dir, f"{STAGING_PREFIX}{self._build}-*")):
            logging.warning("Deleting %s, left by an interrupted build", old)
            file_io.rmtree(old)
        file_io.makedirs(self.path)
        return self

    def __exit__(self, *exc) -> None:
        if file_io.exists(self.path):
            file_io.rmtree(self.path)

    def commit(
        self,
        owned: Sequence[str],
        info_splits: dict,
        num_classes: int | None,
        source: dict,
        replaced_files: Sequence[str] = (),
    ) -> dict:
        """Swaps the staged files in for the old ones and merges dataset_info.json.

        Args:
          owned: the splits this build replaces (every old shard of them goes).
          info_splits: dataset_info.json entries of the staged splits.
          num_classes: the class count (a train build), else None.
          source: what the build read, recorded under sources[build].
          replaced_files: other files of the build (e.g. bad_images-train.csv)
            that go when this build did not write them again.

        Returns:
          The merged dataset_info.json.
        """
        staged = file_io.listdir(self.path)
        with file_lease.locked(file_io.join(self.output_dir, DATASET_INFO_LOCK)):
            for name in owned:
                pattern = file_io.join(self.output_dir, data_format.shard_pattern(name))
                for old in file_io.glob(pattern):
                    file_io.remove(old)
            for name in replaced_files:
                old = file_io.join(self.output_dir, name)
                if name not in staged and file_io.exists(old):
                    file_io.remove(old)
            for name in staged:
                file_io.rename(file_io.join(self.path, name), file_io.join(self.output_dir, name))
            return _update_dataset_info(
                self.output_dir, owned, info_splits, num_classes, source, self._build
            )
