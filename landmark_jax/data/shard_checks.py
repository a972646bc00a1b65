"""Shard integrity: a corrupt record or a wrong count names its shard.

TensorFlow reports a damaged TFRecord as `DataLossError ... corrupted record
at 20993`, without the file; with hundreds of shards the user cannot find
it. The input streams read through `checked_batches`, which on such an error
(and, for evaluation, when the images read differ in number from
dataset_info.json) scans the stream's shards and names each bad one.

The train stream cannot count what it reads (it is endless and resumes in
the middle of an epoch), so `verify_counts` counts each train shard's
records when the stream is created: from the records' length headers alone
(the images are not read), once per state of the build. A shard cut at a
record boundary would otherwise train silently on less data, with the
resume arithmetic (which trusts dataset_info.json's counts) off.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import logging
import os
import struct
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import tensorflow as tf
from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c

from landmark_jax.data import data_format
from landmark_jax.runtime import file_io

# A TFRecord: uint64 length, the length's masked CRC32C, the data, its CRC32C.
_LENGTH_BYTES, _CRC_BYTES = 8, 4
# Shards counted at once: the counting waits on storage, not on the CPU.
_THREADS = 32
# Where verified train splits are remembered between runs, on this machine
# (overridden by this variable); see verify_counts.
CACHE_ENV = "LANDMARK_JAX_CACHE_DIR"


class _CutShort(Exception):
    """A shard whose records' headers do not walk to its end."""


def count_records(path: str) -> int:
    """A TFRecord file's records, counted from their length headers.

    Seeks from header to header: the records' data is neither read nor
    checked (a corrupt image is the reader's to find), each header's own
    checksum is.

    Args:
      path: the shard (local or a URL).

    Returns:
      The number of records.

    Raises:
      DataFormatError: a header fails its checksum or the file ends inside
        a record, naming the file, the record and its byte offset.
    """
    try:
        return _walk_headers(path)
    except _CutShort as e:
        raise data_format.DataFormatError(f"{path}: corrupt ({e})") from None


def _walk_headers(path: str) -> int:
    count, position = 0, 0
    with file_io.open_file(path, "rb") as f:
        f.seek(0, 2)
        size = f.tell()
        while position < size:
            f.seek(position)
            header = f.read(_LENGTH_BYTES + _CRC_BYTES)
            where = f"record {count + 1} at byte {position}"
            if len(header) < _LENGTH_BYTES + _CRC_BYTES:
                raise _CutShort(f"the file ends inside the header of {where}")
            (length,) = struct.unpack("<Q", header[:_LENGTH_BYTES])
            (crc,) = struct.unpack("<I", header[_LENGTH_BYTES:])
            if masked_crc32c(header[:_LENGTH_BYTES]) != crc:
                raise _CutShort(f"the length header of {where} fails its checksum")
            position += _LENGTH_BYTES + _CRC_BYTES + length + _CRC_BYTES
            if position > size:
                raise _CutShort(f"the file ends inside {where} ({length} bytes of data)")
            count += 1
    return count


def _read_through(path: str) -> int:
    """Records of a shard, every byte read and checked by TensorFlow's reader."""
    try:
        return int(tf.data.TFRecordDataset(path).reduce(np.int64(0), lambda n, _: n + 1))
    except tf.errors.DataLossError as e:
        raise _CutShort(e.message.splitlines()[0]) from None


def shard_problems(files, counts, *, read_data: bool = True) -> list[str]:
    """Shards that cannot be read through or hold another number of records.

    Args:
      files: shard paths.
      counts: the records dataset_info.json lists for each.
      read_data: read every record and check its data (the error path of
        a stream that hit a corrupt record); False: count the records from
        their headers alone (count_records), which reads a small part.

    Returns:
      One 'path: what is wrong' line per bad shard, in file order; empty
      when all are sound.
    """
    count: Callable[[str], int] = _read_through if read_data else _walk_headers

    def problem(path: str, expected: int) -> str | None:
        try:
            found = count(path)
        except _CutShort as e:
            return f"{path}: corrupt ({e})"
        if found != expected:
            return f"{path}: {found} records, dataset_info.json lists {expected}"
        return None

    files, counts = list(files), [int(n) for n in counts]
    if len(files) != len(counts):
        raise ValueError(f"{len(files)} shard files but {len(counts)} counts")
    with concurrent.futures.ThreadPoolExecutor(min(_THREADS, max(1, len(files)))) as pool:
        found = list(pool.map(problem, files, counts))
    return [p for p in found if p]


def _refusal(what: str, problems: Sequence[str]) -> data_format.DataFormatError:
    more = f"; and {len(problems) - 5} more" if len(problems) > 5 else ""
    return data_format.DataFormatError(
        f"{what}: " + "; ".join(problems[:5]) + more + "; rebuild the split"
    )


def cache_dir() -> str:
    """This machine's cache folder ($LANDMARK_JAX_CACHE_DIR, else
    $XDG_CACHE_HOME/landmark_jax, else ~/.cache/landmark_jax)."""
    if os.environ.get(CACHE_ENV):
        return os.environ[CACHE_ENV]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "landmark_jax")


# Keys of the shard lists this process has verified (see verify_counts).
_verified: set[str] = set()


def _state_key(files: Sequence[str], counts: Sequence[int]) -> str:
    """A digest of the shards' paths, sizes, modification times and listed
    counts: any rewrite of a shard or of dataset_info.json changes it."""
    with concurrent.futures.ThreadPoolExecutor(min(_THREADS, max(1, len(files)))) as pool:
        fingerprints = list(pool.map(file_io.fingerprint, files))
    rows = zip(files, fingerprints, counts, strict=True)
    state = [[file_io.absolute(f), version, int(n)] for f, version, n in rows]
    return hashlib.sha256(json.dumps(state).encode()).hexdigest()


def verify_counts(files: Sequence[str], counts: Sequence[int], what: str) -> None:
    """Checks that every shard holds the records dataset_info.json lists.

    The records are counted from their headers (count_records), in parallel,
    once per state of the shards: a verified state (the shards' paths, sizes,
    modification times, listed counts) is remembered in this process and in
    a small file in cache_dir() on this machine, never in the data folder
    (a bucket or a read-only copy). Losing that file costs one count again;
    a rewritten shard or dataset_info.json is another state, counted again.

    Args:
      files: the shards (local or URLs).
      counts: the records dataset_info.json lists for each.
      what: the split, for the message (e.g. "split 'train' of DIR").

    Raises:
      DataFormatError: shards that hold another number of records or are
        cut inside a record, each named with what was found and what
        dataset_info.json lists.
    """
    key = _state_key(files, counts)
    record = os.path.join(cache_dir(), "shard_counts", f"{key}.json")
    if key in _verified or _remembered(record):
        _verified.add(key)
        return
    logging.info("%s: counting the records of its %d shard(s), once", what, len(files))
    problems = shard_problems(files, counts, read_data=False)
    if problems:
        raise _refusal(f"{what}: {len(problems)} of its {len(files)} shard(s) disagree", problems)
    _verified.add(key)
    summary = {"what": what, "shards": len(files), "records": int(sum(counts))}
    try:
        file_io.write_json(record, summary)
    except OSError as e:  # a cache: the run goes on, and counts again next time
        logging.warning("could not remember the verified shard counts in %s (%s)", record, e)


def _remembered(record: str) -> bool:
    try:
        return isinstance(file_io.read_json(record), dict)
    except (OSError, ValueError):  # not there, or damaged: counted again
        return False


def shard_error(files, counts, what: str) -> data_format.DataFormatError:
    """A DataFormatError saying `what`, then naming each bad shard (scanned)."""
    problems = shard_problems(files, counts) or [f"{len(files)} shard(s) read without error"]
    return _refusal(what, problems)


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
