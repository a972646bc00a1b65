"""Shard integrity: a corrupt record or a wrong count names its shard.

TensorFlow reports a damaged TFRecord as `DataLossError ... corrupted record
at 20993`, without the file; with hundreds of shards the user cannot find
it. The input streams read through `checked_batches`, which on such an error
(and, for evaluation, when the images read differ in number from
dataset_info.json) scans the stream's shards and names each bad one.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import tensorflow as tf

from landmark_jax import data_format


def shard_problems(files, counts) -> list[str]:
    """Shards that cannot be read through or hold another number of records.

    Reads every record of every file (an error path, or a check on demand).

    Args:
      files: shard paths.
      counts: the records dataset_info.json lists for each.

    Returns:
      One 'path: what is wrong' line per bad shard; empty when all are sound.
    """
    problems = []
    for path, expected in zip(files, counts, strict=True):
        try:
            found = int(tf.data.TFRecordDataset(path).reduce(np.int64(0), lambda n, _: n + 1))
        except tf.errors.DataLossError as e:
            problems.append(f"{path}: corrupt ({e.message.splitlines()[0]})")
            continue
        if found != expected:
            problems.append(f"{path}: {found} records, dataset_info.json lists {expected}")
    return problems


def shard_error(files, counts, what: str) -> data_format.DataFormatError:
    """A DataFormatError saying `what`, then naming each bad shard (scanned)."""
    problems = shard_problems(files, counts) or [f"{len(files)} shard(s) read without error"]
    return data_format.DataFormatError(
        f"{what}: " + "; ".join(problems[:5]) + "; rebuild the split"
    )


def checked_batches(dataset, files, counts, expected_rows: int | None) -> Iterator[Any]:
    """The dataset's numpy batches, with its shards checked as they are read.

    Args:
      dataset: a tf.data pipeline over `files`.
      files, counts: the shards it reads and the records each should hold.
      expected_rows: for an eval stream (batches with a 'mask'), the images it
        must yield in all; None for the train stream.

    Yields:
      The batches, as numpy.

    Raises:
      DataFormatError: a corrupt record, or (eval) another number of images
        than recorded; the message names the shard(s) and what is wrong.
    """
    batches = dataset.as_numpy_iterator()
    rows = 0
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            break
        except tf.errors.DataLossError:
            raise shard_error(files, counts, "unreadable TFRecord data") from None
        if expected_rows is not None:
            rows += int(batch["mask"].sum())
        yield batch
    if expected_rows is not None and rows != expected_rows:
        raise shard_error(
            files, counts, f"read {rows} images where dataset_info.json lists {expected_rows}"
        )
