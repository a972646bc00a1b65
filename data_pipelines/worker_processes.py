"""The worker processes of the builders: how many a folder allows, and the
in-order parallel map that encodes a split's images.

TensorFlow's ram:// filesystem lives in one process's memory: what a worker
process writes there is lost with the worker, and what this process wrote
there is out of a worker's reach, so such folders get one.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from landmark_jax.runtime import file_io

# Errors a worker raises about its input (a bad image, an unreadable file),
# raised again in the builder's process (see map_in_order).
INPUT_ERRORS = (ValueError, OSError)

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
            f"processes cannot reach (num_workers={num_workers}); use num_workers=1"
        )


def default_num_workers(path: str, wanted: int) -> int:
    """`wanted`, or 1 for a folder only this process can see (ram://)."""
    return 1 if file_io.scheme(path) in _IN_PROCESS_SCHEMES else wanted


def map_in_order(
    function: Callable[[Any], Any],
    items: Sequence[Any],
    *,
    num_workers: int | None,
    data_dir: str,
    manual_dir: str,
) -> Iterator[Any]:
    """`map(function, items)`, over worker processes when there may be several.

    Args:
      function: a module-level function (pickled to the workers).
      items: its inputs.
      num_workers: processes; None for one per core (one when data_dir or
        manual_dir is in-process memory, ram://).
      data_dir: where the build is written.
      manual_dir: what the workers read.

    Yields:
      function(item) for each item, in order.

    Raises:
      ValueError: num_workers > 1 with a ram:// data_dir or manual_dir.
      The workers' ValueError / OSError (a bad image names its file), raised
      again from this process.
    """
    if num_workers is None:
        num_workers = default_num_workers(data_dir, os.cpu_count() or 1)
        num_workers = default_num_workers(manual_dir, num_workers)
    check_num_workers(data_dir, num_workers, flag="data_dir")
    check_num_workers(manual_dir, num_workers, flag="manual_dir")
    num_workers = min(num_workers, len(items))
    if num_workers <= 1:
        yield from map(function, items)
        return
    # spawn, not fork: TensorFlow's runtime does not survive a fork.
    with multiprocessing.get_context("spawn").Pool(num_workers) as pool:
        try:
            yield from pool.imap(function, items, chunksize=16)
        except INPUT_ERRORS as e:
            # Re-raised by the pool, its innermost frame is multiprocessing's,
            # and the command line (entry_point_errors) would print it as a bug.
            raise type(e)(str(e)) from e
