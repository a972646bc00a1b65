"""How many worker processes a builder may use for a folder.

TensorFlow's ram:// filesystem lives in one process's memory: what a worker
process writes there is lost with the worker, so such folders get one.
"""

from __future__ import annotations

from landmark_jax import file_io

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
