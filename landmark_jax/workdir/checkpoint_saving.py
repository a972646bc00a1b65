"""Saving train states: room on the disk first, then Orbax, then integrity records.

`save` checks that a local disk holds the state before Orbax's writer
threads start (a checkpoint that does not fit would fail inside them, with
hundreds of lines of their errors and a half-written folder), and names a
disk that fills meanwhile. `record_integrity` writes each finalized step's
own integrity record (checkpoint_integrity.py) for the steps this run saved.
"""

from __future__ import annotations

import errno
from collections.abc import MutableSet
from typing import Any

import jax
import orbax.checkpoint as ocp

from landmark_jax.runtime import file_io
from landmark_jax.workdir import checkpoint_integrity, checkpointing


def record_integrity(manager: ocp.CheckpointManager, pending: MutableSet[int]) -> None:
    """Writes the integrity record of each step of `pending` that Orbax has finalized.

    Only steps this run saved are recorded (`pending`: the trainer adds each
    step it saves): recording a step found on disk would vouch for bytes
    nobody checked. Steps recorded, or gone (max_to_keep), leave `pending`.

    Args:
      manager: the workdir's checkpoint manager.
      pending: steps saved by this run and not yet recorded; updated.
    """
    directory = str(manager.directory)
    finalized = set(checkpointing.saved_steps(directory))
    ready = sorted(step for step in pending if step in finalized)
    if jax.process_index() == 0:
        checkpoint_integrity.write_records(directory, ready)
    # Orbax finishes a save before it starts the next: only the newest step
    # can still be in flight; an older one not on disk was removed.
    newest = max(pending, default=None)
    pending.clear()
    if newest is not None and newest not in finalized:
        pending.add(newest)


def save_args(state: Any) -> ocp.args.StandardSave:
    """What CheckpointManager.save takes for a train state."""
    return ocp.args.StandardSave(state)


def _disk_full(directory: str, what: str) -> OSError:
    free = file_io.free_bytes(directory)
    latest = checkpointing.latest_step(directory)
    error = OSError(
        f"no space left on the disk of {directory}: {what}"
        + (f"; {free:,} bytes free" if free is not None else "")
        + ". Free space, or move the workdir to a larger disk, and run the same command "
        + (
            f"again: it resumes from step {latest}, its latest complete checkpoint"
            if latest is not None
            else "again: no checkpoint was completed, so it starts at step 0"
        )
    )
    error.errno = errno.ENOSPC
    return error


def save(manager: ocp.CheckpointManager, step: int, state: Any, force: bool = False) -> None:
    """Saves `state` as `step` (async), first checking that it fits on a local disk.

    A checkpoint that does not fit would fail inside Orbax's writer threads,
    leaving a half-written folder and hundreds of lines of their errors; so
    a local disk must hold the state's bytes (plus 10% and 1 MiB for
    metadata) before the save starts. A disk that fills meanwhile (another
    writer) is reported the same way.

    Raises:
      OSError: (errno ENOSPC) the disk has no room, naming the folder, the
        bytes needed and free, and the step a rerun resumes from.
    """
    directory = str(manager.directory)
    needed = int(sum(x.nbytes for x in jax.tree.leaves(state)) * 1.1) + (1 << 20)
    free = file_io.free_bytes(directory)
    if free is not None and free < needed:
        raise _disk_full(directory, f"the step-{step} checkpoint needs about {needed:,} bytes")
    try:
        manager.save(step, args=save_args(state), force=force)
    except Exception as e:
        if (what := file_io.no_space_left(e)) is not None:
            raise _disk_full(directory, f"a checkpoint write failed ({what})") from e
        raise


def wait_until_finished(manager: ocp.CheckpointManager) -> None:
    """Waits for the save in flight; a disk that filled is reported as by `save`.

    Raises:
      OSError: (errno ENOSPC) the save ran out of disk space (named).
    """
    try:
        manager.wait_until_finished()
    except Exception as e:
        if (what := file_io.no_space_left(e)) is not None:
            raise _disk_full(str(manager.directory), f"a checkpoint write failed ({what})") from e
        raise
