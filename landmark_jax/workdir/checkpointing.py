"""Orbax checkpoints: the workdir's manager, shape checks, and stage carry-over.

The train state is a dict {'step', 'params', 'batch_stats', 'opt_state',
'nonfinite'} with params {'model': ..., 'head': ...}. A run starts from, in
order: its workdir's latest checkpoint (exact resume); the previous stage's
checkpoint (`config.init.checkpoint`: backbone + neck, and the head too with
`init.carry='all'`); Keras-converted backbone weights (`config.init.backbone`);
or scratch.

Orbax neither names the parameter on a shape mismatch nor refuses to pad when
asked to be lenient, so every restore is preceded by a comparison against the
checkpoint's metadata that names the parameter, both shapes and the config key
that decides that shape.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from landmark_jax.runtime import file_io, sharding
from landmark_jax.workdir import checkpoint_fit, checkpoint_integrity

CHECKPOINT_DIR = "checkpoints"

# Orbax's replica-parallel saving has every replica of a replicated array
# write a slice of it, each slice cut by its own dispatched op. For the
# hundreds of small arrays of a model (BatchNorm statistics, biases, 3x3
# kernels) that costs more than it saves: measured on 8 CPU devices, the
# first save of efficientnet_tiny took 15 s in 2,052 slice ops. Arrays whose
# per-replica slice would be under this size are written by one replica.
MIN_REPLICA_SLICE_BYTES = 1 << 20


@functools.cache
def _register_array_handler() -> None:
    """Orbax's jax.Array handler with MIN_REPLICA_SLICE_BYTES, once per process
    (Orbax's handler registry is global)."""
    ocp.type_handlers.register_type_handler(
        jax.Array,
        ocp.type_handlers.ArrayHandler(
            min_slice_bytes_for_replica_parallel=MIN_REPLICA_SLICE_BYTES
        ),
        override=True,
    )


def create_manager(workdir: str, keep: int, async_save: bool = True) -> ocp.CheckpointManager:
    """The workdir's checkpoint manager (keeps the newest `keep` steps).

    Its first call also sets how this process's Orbax saves jax.Arrays
    (`MIN_REPLICA_SLICE_BYTES`); every save of a train state goes through a
    manager made here.
    """
    _register_array_handler()
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, enable_async_checkpointing=async_save, create=True
    )
    # The handler is named up front so item_metadata works before any save.
    return ocp.CheckpointManager(
        file_io.join(file_io.checkpoint_path(workdir), CHECKPOINT_DIR),
        options=options,
        item_handlers=ocp.StandardCheckpointHandler(),
    )


def _checkpoint_dir(path: str) -> str:
    """Accepts a workdir or its checkpoints/ folder (local or gs://)."""
    path = file_io.checkpoint_path(path)
    nested = file_io.join(path, CHECKPOINT_DIR)
    return nested if file_io.isdir(nested) else path


@dataclasses.dataclass(frozen=True)
class Restored:
    """A restored train state and what its integrity check found."""

    state: Any
    step: int
    verdict: checkpoint_integrity.Verdict


def restore_latest(
    manager: ocp.CheckpointManager, abstract_state: Any, changes: Sequence[str] = ()
) -> Restored | None:
    """The workdir's newest intact state, sharded like `abstract_state`, or None.

    Each step, newest first, is checked against its integrity record
    (checkpoint_integrity.py). A step whose recorded files are missing or
    differ, or an unverified one (no record) whose data Orbax cannot read, is
    damaged. Once an older step restores, the damaged newer ones are moved
    aside (never deleted) so that training saves those steps again.
    A step that verified is never declared damaged: a read that fails on it
    is retried, then fails the run.

    Args:
      manager: the workdir's checkpoint manager.
      abstract_state: the state of the current config (shapes, shardings).
      changes: config keys changed since the checkpoint ('key: old -> new'),
        named in a mismatch error.

    Returns:
      The restored state with its step and verdict, or None (no checkpoint).

    Raises:
      ValueError: the checkpoint does not fit the config (named parameter or
        array, and the changed config keys); nothing is moved.
      OSError: a read of a verified step still failed after the retries
        (named); nothing is moved.
      RuntimeError: every saved step is damaged (each named, left in place).
    """
    directory = str(manager.directory)
    steps = sorted(manager.all_steps(), reverse=True)
    damaged: list[tuple[int, str]] = []
    for step in steps:
        source = file_io.join(directory, str(step))
        verdict = checkpoint_integrity.check(directory, step)
        logging.info("Checkpoint %s: %s (%s)", source, verdict.status, verdict.evidence)
        if verdict.status == checkpoint_integrity.DAMAGED:
            damaged.append((step, verdict.evidence))
            continue
        try:
            tree = checkpoint_integrity.with_retries(
                lambda step=step: _metadata_tree(manager.item_metadata(step)),
                f"{source} (its metadata)",
            )
        except Exception as e:  # noqa: BLE001 - Orbax's errors for bad data vary
            damaged.append((step, _unreadable(source, verdict, e)))
            continue
        # A config that does not fit is the config's error, raised as it is.
        checkpoint_fit.check_shapes(
            tree, abstract_state, source, ("params/", "batch_stats/"), changes
        )
        checkpoint_fit.check_structure(tree, abstract_state, source, changes)
        try:
            state = checkpoint_integrity.with_retries(
                lambda step=step: manager.restore(
                    step, args=ocp.args.StandardRestore(abstract_state)
                ),
                source,
            )
        except Exception as e:  # noqa: BLE001 - Orbax's errors for bad data vary
            damaged.append((step, _unreadable(source, verdict, e)))
            continue
        for bad, evidence in damaged:
            checkpoint_integrity.move_aside(directory, bad, evidence)
        if damaged:
            manager.reload()
        return Restored(state, step, verdict)
    if damaged:
        raise RuntimeError(
            f"every checkpoint in {directory} is damaged:\n"
            + "\n".join(f"  step {step}: {why}" for step, why in damaged)
            + "\nnothing was moved or deleted. To start over at step 0, move the folder "
            f"aside (mv {directory} {directory}-damaged) and run the same command again"
        )
    return None


def _unreadable(source: str, verdict: checkpoint_integrity.Verdict, error: Exception) -> str:
    """The evidence of an unverified step Orbax cannot read; raises for a verified one."""
    what = f"{type(error).__name__}: {str(error)[:300]}"
    if verdict.status == checkpoint_integrity.VERIFIED:
        # Its bytes are the ones saved: whatever failed is not the checkpoint.
        raise OSError(
            f"checkpoint {source} matches the digests recorded when it was saved, yet it "
            f"cannot be restored ({what}); it is left as it is"
        ) from error
    return f"{verdict.evidence}, and Orbax cannot read it ({what})"


def _metadata_tree(metadata: Any) -> Mapping[str, Any]:
    tree = getattr(metadata, "tree", metadata)
    return tree


def saved_steps(path: str) -> list[int]:
    """The finalized checkpoint steps of a workdir (or checkpoints/ folder), sorted.

    A step still being written (a local temporary folder, or a bucket folder
    without Orbax's commit marker) is not one.
    """
    directory = _checkpoint_dir(path)
    if not file_io.isdir(directory):
        return []
    return sorted(ocp.utils.checkpoint_steps(directory))


def latest_step(path: str) -> int | None:
    """The newest finalized checkpoint step of a workdir, or None."""
    steps = saved_steps(path)
    return steps[-1] if steps else None


def load_stage(path: str, role: str = "") -> dict[str, Any]:
    """The params and batch_stats of a run's latest checkpoint, on the host.

    Only the model is read (no optimizer state, which is twice the size of
    the params under Adam), as numpy arrays: the checkpoint then loads on any
    device count, not only on the topology it was saved from.

    Args:
      path: a run's workdir, or its checkpoints/ folder.
      role: what the caller reads it as (e.g. 'config.init.checkpoint'), to
        open an error message with.

    Returns:
      {'params': ..., 'batch_stats': ..., 'step': int} as numpy.

    Raises:
      FileNotFoundError: no checkpoint there.
      ValueError: the latest step is damaged (its files differ from their
        recorded digests, or it is unverified and cannot be restored), named
        with the file.
      OSError: a read failed after its retries, or a verified step cannot be
        restored (named; not damage).
    """
    directory = _checkpoint_dir(path)
    options = ocp.CheckpointManagerOptions(create=False, read_only=True)
    with ocp.CheckpointManager(
        directory, options=options, item_handlers=ocp.PyTreeCheckpointHandler()
    ) as m:
        step = m.latest_step()
        if step is None:
            raise FileNotFoundError(
                (f"{role}: " if role else "")
                + f"no checkpoint in {directory}: {path!r} has not saved a training step yet"
            )
        # Not a silent fallback to an older step, as a resume does: a caller
        # that reads "the run's weights" must not get other ones unasked.
        source = f"{directory}/{step}"
        damaged = (
            f"{role + ': ' if role else ''}checkpoint {source} is damaged: {{}}; to use the "
            f"step before it, move that step's folder aside (mv {source} "
            f"{directory}/{checkpoint_integrity.DAMAGED_PREFIX}{step}), which keeps it"
        )
        verdict = checkpoint_integrity.check(directory, step)
        if verdict.status == checkpoint_integrity.DAMAGED:
            raise ValueError(damaged.format(verdict.evidence))

        def read():
            saved = _metadata_tree(m.item_metadata(step))
            target = {
                k: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), saved[k])
                for k in ("params", "batch_stats", "step")
            }
            as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), target)
            return m.restore(
                step,
                args=ocp.args.PyTreeRestore(
                    item=target, restore_args=as_numpy, partial_restore=True
                ),
            )

        try:
            restored = checkpoint_integrity.with_retries(read, source)
        except Exception as e:  # noqa: BLE001 - Orbax's errors for missing or bad files vary
            raise ValueError(damaged.format(_unreadable(source, verdict, e))) from e
    host = jax.tree.map(np.asarray, {k: restored[k] for k in ("params", "batch_stats")})
    return {**host, "step": int(restored["step"])}


def carry_over(state: dict, stage: Mapping[str, Any], carry: str, source: str) -> dict:
    """Puts a previous stage's weights into a freshly initialised state.

    Args:
      state: the new state (params/batch_stats with 'model' and 'head'); the
        carried subtrees may hold only their shapes, dtypes and shardings
        (Program.initial_state leaves them out).
      stage: load_stage's output.
      carry: 'model' (backbone + neck; the head stays new, e.g. 81,313 ->
        203,094 classes) or 'all' (the head too, e.g. a resolution change).
      source: the checkpoint path, for messages.

    Returns:
      The state with the carried parameters, placed with the new state's
      shardings. The optimizer state and the step stay fresh.

    Raises:
      ValueError: a carried parameter's shape differs (named, with both
        shapes and the config key).
    """
    paths = carried_paths(carry)
    prefixes = tuple(f"{k}/{path[0]}/" for k in ("params", "batch_stats") for path in paths)
    checkpoint_fit.check_shapes(stage, state, source, prefixes)
    return _put(state, stage, paths)


# Where carry_over and load_backbone_weights put what they load (below
# params and batch_stats): what a new stage need not initialise.
BACKBONE_PATH = ("model", "backbone")


def carried_paths(carry: str) -> list[tuple[str, ...]]:
    """The subtrees carry_over puts into the new state, for `carry`
    ('model' or 'all')."""
    return [("model",), ("head",)] if carry == "all" else [("model",)]


def load_backbone_weights(state: dict, variables: Mapping[str, Any], source: str) -> dict:
    """Puts Keras-converted backbone variables under params/model/backbone.

    Raises:
      ValueError: a variable's shape differs from the model's backbone.
    """
    stage = {
        key: {"model": {"backbone": variables.get(key, {})}} for key in ("params", "batch_stats")
    }
    prefixes = ("params/model/backbone/", "batch_stats/model/backbone/")
    checkpoint_fit.check_shapes(stage, state, source, prefixes)
    return _put(state, stage, [BACKBONE_PATH])


def _put(state: dict, stage: Mapping[str, Any], paths: list[tuple[str, ...]]) -> dict:
    """`state` with `stage`'s params and batch_stats subtrees at each path
    (keys below params/batch_stats, e.g. ('model', 'backbone')), cast to the
    state's dtypes and placed with its shardings. A subtree the stage lacks
    stays as it is."""

    def put(tree, loaded, path):
        key, *rest = path
        if key not in loaded:
            return tree
        if rest:
            value = put(tree[key], loaded[key], rest)
        else:
            value = jax.tree.map(
                lambda old, x: sharding.place(np.asarray(x).astype(old.dtype), old.sharding),
                tree[key],
                loaded[key],
            )
        return {**tree, key: value}

    new = dict(state)
    for key in ("params", "batch_stats"):
        for path in paths:
            new[key] = put(new[key], stage[key], path)
    return new
