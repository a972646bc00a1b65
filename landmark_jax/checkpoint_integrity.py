"""Checkpoint integrity: a digest of every file of a saved step, checked on restore.

Orbax restores whatever bytes a checkpoint holds: random bytes written into a
data file come back as parameters (up to 3e38) without a word, and a deleted
file ends in an error buried under hundreds of lines. So, once a step is
finalized, the trainer writes `checkpoints_digests/<step>.json` beside the
checkpoints/ folder (outside it, where Orbax never looks): the SHA-256 of each
of the step's files. On resume, `damage` compares them; the
restore (checkpointing.restore_latest) skips a damaged step, says which file
failed, and falls back to the newest intact one. A step without digests (one
written by an older version, or cut off before they were written) is not
verified; a failed restore of it counts as damage too.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable

from landmark_jax import file_io

# Beside the checkpoints/ folder: <checkpoints>_digests/<step>.json.
DIGESTS_SUFFIX = "_digests"
_CHUNK = 16 << 20


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


def digest_path(directory: str, step: int) -> str:
    """Where a step's digests are kept."""
    return file_io.join(directory.rstrip("/") + DIGESTS_SUFFIX, f"{step}.json")


def forget(directory: str, step: int) -> None:
    """Removes a step's digests (the step is being deleted)."""
    path = digest_path(directory, step)
    if file_io.exists(path):
        file_io.remove(path)


def record_digests(directory: str, steps: Iterable[int]) -> None:
    """Records the digests of each finalized step that has none yet.

    Args:
      directory: the checkpoints/ folder (local or gs://).
      steps: finalized steps (checkpointing.saved_steps); a step removed
        meanwhile (max_to_keep) is skipped.
    """
    for step in steps:
        folder = file_io.join(directory, str(step))
        target = digest_path(directory, step)
        try:
            if file_io.exists(target):
                continue
            names = _relative_files(folder)
            digests = {name: _sha256(file_io.join(folder, name)) for name in names}
        except FileNotFoundError:
            continue  # deleted by the manager while being read
        file_io.write_json(target, digests)


def damage(directory: str, step: int) -> str | None:
    """What is wrong with a saved step's files, or None (intact, or unverified).

    Args:
      directory: the checkpoints/ folder.
      step: the step.

    Returns:
      None when the files match the recorded digests or none were recorded; else a
      description naming the first bad file ('<file>: missing' or
      '<file>: its SHA-256 differs from the one recorded').
    """
    folder = file_io.join(directory, str(step))
    recorded_path = digest_path(directory, step)
    if not file_io.exists(recorded_path):
        return None
    try:
        recorded = file_io.read_json(recorded_path)
    except ValueError as e:
        return str(e)
    for name, digest in sorted(recorded.items()):
        path = file_io.join(folder, name)
        if not file_io.exists(path):
            return f"{path}: missing"
        if _sha256(path) != digest:
            return f"{path}: its SHA-256 differs from the one recorded when it was saved"
    logging.info("checkpoint %s/%d: %d files verified", directory, step, len(recorded))
    return None
