"""Checkpoint integrity: each saved step carries the digests of its own files.

Orbax restores whatever bytes a checkpoint holds: random bytes written into a
data file come back as parameters (up to 3e38) without a word. So once a step
is finalized, the trainer writes `<step>/integrity.json` inside the step's own
folder: the SHA-256 of each of the step's files. The record lives and dies
with its step: Orbax's `max_to_keep`, a user's `rm -r checkpoints/40` or a
moved-aside folder take it along, and a step saved again under the same number
gets a record of its own. (A record kept outside the step would outlive it
and condemn every later step saved under that number.)

What a check can conclude, and what the caller does with it:

- `VERIFIED`: every recorded file is there with its digest.
- `UNVERIFIED`: no record (the run stopped between the commit and the
  record) or a record that is not readable JSON. Never damage for that
  alone: the step is checked structurally (Orbax reads its metadata and
  shapes) and restored.
- `DAMAGED`: a recorded file is missing or its bytes differ. The caller moves
  the step aside (`move_aside`: renamed to `damaged-<step>-<UTC time>`,
  where Orbax no longer lists it) and falls back to the step before. Nothing
  is ever deleted.

A read that fails for another reason (a network error, a timeout) is retried
with a bounded back-off (`with_retries`) and then fails the run naming the
file, changing nothing.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterable
from typing import TypeVar

from landmark_jax.runtime import file_io

RECORD_NAME = "integrity.json"
# The prefix of a damaged step moved aside (Orbax lists only integer names).
DAMAGED_PREFIX = "damaged-"
# A transient read error is retried after 1, 2 and 4 s; then the run fails.
RETRY_DELAYS = (1.0, 2.0, 4.0)
_CHUNK = 16 << 20

VERIFIED, UNVERIFIED, DAMAGED = "verified", "unverified", "damaged"

T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class Verdict:
    """What a step's integrity check found.

    Attributes:
      status: VERIFIED, UNVERIFIED or DAMAGED.
      evidence: for UNVERIFIED, why; for DAMAGED, the file at fault and what
        is wrong with it; for VERIFIED, how many files matched.
    """

    status: str
    evidence: str


def _relative_files(folder: str, prefix: str = "") -> list[str]:
    """Every file below `folder`, as paths relative to it, sorted."""
    files = []
    for name in sorted(file_io.listdir(folder)):
        name = name.rstrip("/")
        path = file_io.join(folder, name)
        if file_io.isdir(path):
            files.extend(_relative_files(path, f"{prefix}{name}/"))
        else:
            files.append(f"{prefix}{name}")
    return files


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with file_io.open_file(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def with_retries(read: Callable[[], T], what: str) -> T:
    """`read()`, retried after RETRY_DELAYS on an error that may pass.

    A missing file is an answer, not a transient error: FileNotFoundError is
    raised at once.

    Args:
      read: the read to make.
      what: the file or step being read, for the message.

    Returns:
      What `read` returned.

    Raises:
      FileNotFoundError: at once.
      OSError: every try failed; names `what`, the tries and the last error.
    """
    for attempt, delay in enumerate((*RETRY_DELAYS, None)):
        try:
            return read()
        except FileNotFoundError:
            raise
        except Exception as e:  # noqa: BLE001 - storage layers raise many types
            if delay is None:
                raise OSError(
                    f"{what}: could not be read after {attempt + 1} tries "
                    f"({type(e).__name__}: {str(e)[:300]}); nothing was changed: "
                    "run the same command again once the storage answers"
                ) from e
            logging.warning(
                "%s: read failed (%s: %s); retrying in %.0f s", what, type(e).__name__, e, delay
            )
            time.sleep(delay)
    raise AssertionError("unreachable")


def record_path(directory: str, step: int) -> str:
    """Where a step's integrity record is kept: inside the step's folder."""
    return file_io.join(directory, str(step), RECORD_NAME)


def write_record(directory: str, step: int) -> None:
    """Records the digest of every file of a finalized step, in the step's folder.

    Args:
      directory: the checkpoints/ folder (local or gs://).
      step: a step this run saved and Orbax finalized.
    """
    folder = file_io.join(directory, str(step))
    try:
        names = [n for n in _relative_files(folder) if n != RECORD_NAME]
        digests = {name: _sha256(file_io.join(folder, name)) for name in names}
    except FileNotFoundError:
        return  # removed by the manager (max_to_keep) while being read
    file_io.write_json(record_path(directory, step), {"sha256": digests})


def write_records(directory: str, steps: Iterable[int]) -> None:
    """write_record for each of `steps`."""
    for step in steps:
        write_record(directory, step)


def check(directory: str, step: int) -> Verdict:
    """Compares a saved step's files with its integrity record.

    Args:
      directory: the checkpoints/ folder.
      step: the step.

    Returns:
      The verdict (see the module docstring).

    Raises:
      OSError: a file could not be read after the retries (named); that is
        not evidence of damage.
    """
    folder = file_io.join(directory, str(step))
    path = record_path(directory, step)
    if not with_retries(lambda: file_io.exists(path), path):
        return Verdict(UNVERIFIED, f"{path}: no integrity record")
    try:
        data = with_retries(lambda: file_io.read_bytes(path), path)
    except FileNotFoundError:
        return Verdict(UNVERIFIED, f"{path}: no integrity record")
    try:
        recorded = json.loads(data)["sha256"]
        if not isinstance(recorded, dict):
            raise ValueError("'sha256' is not a mapping")
    except (ValueError, KeyError, TypeError) as e:
        return Verdict(UNVERIFIED, f"{path}: not a readable integrity record ({e})")
    for name, digest in sorted(recorded.items()):
        file = file_io.join(folder, name)
        try:
            actual = with_retries(lambda file=file: _sha256(file), file)
        except FileNotFoundError:
            return Verdict(DAMAGED, f"{file}: missing")
        if actual != digest:
            return Verdict(
                DAMAGED, f"{file}: its SHA-256 differs from the one recorded when it was saved"
            )
    return Verdict(VERIFIED, f"{len(recorded)} files match their digests ({path})")


def move_aside(directory: str, step: int, evidence: str) -> str:
    """Moves a damaged step out of Orbax's sight, keeping every byte.

    Args:
      directory: the checkpoints/ folder.
      step: the damaged step.
      evidence: what is wrong with it, for the log.

    Returns:
      Where the step now is: `<directory>/damaged-<step>-<UTC time>`.
    """
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    target = file_io.join(directory, f"{DAMAGED_PREFIX}{step}-{stamp}")
    file_io.move_folder(file_io.join(directory, str(step)), target)
    logging.warning(
        "Checkpoint %s/%d is damaged (%s); moved it aside to %s, where it stays for you to "
        "inspect (nothing is deleted)",
        directory,
        step,
        evidence,
        target,
    )
    return target
