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

import logging
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import traverse_util

from landmark_jax import checkpoint_integrity, file_io

CHECKPOINT_DIR = "checkpoints"

# Orbax's replica-parallel saving has every replica of a replicated array
# write a slice of it, each slice cut by its own dispatched op. For the
# hundreds of small arrays of a model (BatchNorm statistics, biases, 3x3
# kernels) that costs more than it saves: measured on 8 CPU devices, the
# first save of efficientnet_tiny took 15 s in 2,052 slice ops. Arrays whose
# per-replica slice would be under this size are written by one replica.
MIN_REPLICA_SLICE_BYTES = 1 << 20
ocp.type_handlers.register_type_handler(
    jax.Array,
    ocp.type_handlers.ArrayHandler(min_slice_bytes_for_replica_parallel=MIN_REPLICA_SLICE_BYTES),
    override=True,
)

# Which config keys (of config_lib.base_config(); tested) set a parameter's
# shape, by where it lives, and a note. num_classes left None is the data's
# class count (its features.json).
_SHAPE_HINTS = (
    (
        "params/head/",
        ("num_classes", "head.num_subcenters", "model.embedding_dim"),
        "num_classes None: the data set's class count; to start a new head use init.carry='model'",
    ),
    ("params/model/backbone/", ("model.backbone",), ""),
    ("batch_stats/model/backbone/", ("model.backbone",), ""),
    ("params/model/", ("model.embedding_dim", "model.neck", "model.dolg"), ""),
    ("batch_stats/model/", ("model.embedding_dim", "model.neck", "model.dolg"), ""),
)


def create_manager(workdir: str, keep: int, async_save: bool = True) -> ocp.CheckpointManager:
    """The workdir's checkpoint manager (keeps the newest `keep` steps)."""
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


def _flat_shapes(tree: Mapping[str, Any], keys=("params", "batch_stats")) -> dict[str, tuple]:
    flat = {}
    for key in keys:
        if key in tree and tree[key] is not None:
            for path, leaf in traverse_util.flatten_dict(dict(tree[key]), sep="/").items():
                flat[f"{key}/{path}"] = tuple(leaf.shape)
    return flat


def _hint(path: str) -> str:
    for prefix, keys, note in _SHAPE_HINTS:
        if path.startswith(prefix):
            return ", ".join(keys) + (f"; {note}" if note else "")
    return "the model config"


def check_shapes(
    saved: Mapping[str, Any], expected: Mapping[str, Any], source: str, prefixes: tuple[str, ...]
) -> None:
    """Compares parameter shapes of a checkpoint with the model's.

    Args:
      saved: the checkpoint's metadata tree (or arrays) with 'params' and
        'batch_stats'.
      expected: the abstract (or real) state of the current model.
      source: the checkpoint path, for the message.
      prefixes: the flattened paths to compare, e.g. ('params/model/',).

    Raises:
      ValueError: naming each differing or missing parameter, both shapes
        and the config key to change.
    """
    got, want = _flat_shapes(saved), _flat_shapes(expected)
    problems = []
    for path in sorted(want):
        if not path.startswith(prefixes):
            continue
        if path not in got:
            problems.append(f"  {path}: in the model {want[path]}, not in the checkpoint")
        elif got[path] != want[path]:
            problems.append(
                f"  {path}: checkpoint {got[path]} vs model {want[path]} "
                f"(config keys: {_hint(path)})"
            )
    problems += [
        f"  {path}: in the checkpoint {got[path]}, not in the model ({_hint(path)})"
        for path in sorted(got)
        if path.startswith(prefixes) and path not in want
    ]
    if problems:
        raise ValueError(
            f"checkpoint {source} does not fit the model ({len(problems)} parameter(s)):\n"
            + "\n".join(problems[:20])
        )


def restore_latest(manager: ocp.CheckpointManager, abstract_state: Any) -> Any | None:
    """The workdir's newest intact state, sharded like `abstract_state`, or None.

    A damaged step (files that differ from their recorded digests, or a
    restore that fails) is logged with the file or error at fault and
    deleted, so that training can save that step again; the next older step
    is tried (checkpoint_integrity.py).

    Raises:
      ValueError: the checkpoint's shapes differ from the model's (a config
        changed under an existing workdir).
      RuntimeError: every saved step is damaged (each named).
    """
    directory = str(manager.directory)
    damaged = []
    for step in sorted(manager.all_steps(), reverse=True):
        source = file_io.join(directory, str(step))
        problem = checkpoint_integrity.damage(directory, step)
        if problem is None:
            try:
                tree = _metadata_tree(manager.item_metadata(step))
            except Exception as e:  # noqa: BLE001 - any failure to read it is damage
                problem = f"unreadable metadata ({type(e).__name__}: {e})"
        if problem is None:
            check_shapes(tree, abstract_state, source, ("params/", "batch_stats/"))
            try:
                state = manager.restore(step, args=ocp.args.StandardRestore(abstract_state))
            except Exception as e:  # noqa: BLE001 - Orbax's errors for missing or bad files vary
                problem = f"restore failed ({type(e).__name__}: {str(e)[:300]})"
        if problem is None:
            for bad in damaged:
                logging.warning("Deleting damaged checkpoint %s/%d", directory, bad)
                manager.delete(bad)
                checkpoint_integrity.forget(directory, bad)
            return state
        logging.warning("Checkpoint %s is damaged: %s; trying the one before", source, problem)
        damaged.append(step)
    if damaged:
        raise RuntimeError(
            f"every checkpoint in {directory} is damaged (steps {damaged}); see the warnings "
            "above for the file at fault, or remove the folder to start over"
        )
    return None


def record_digests(manager: ocp.CheckpointManager) -> None:
    """Records the file digests of the finalized steps that lack them (process 0)."""
    if jax.process_index() == 0:
        directory = str(manager.directory)
        checkpoint_integrity.record_digests(directory, saved_steps(directory))


def save_args(state: Any) -> ocp.args.StandardSave:
    """What CheckpointManager.save takes for a train state."""
    return ocp.args.StandardSave(state)


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
        recorded digests, or it cannot be restored), named with the file.
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
        damaged = (
            f"{role + ': ' if role else ''}checkpoint {directory}/{step} is damaged: {{}}; "
            "delete that step's folder to use the step before it"
        )
        problem = checkpoint_integrity.damage(directory, step)
        if problem is not None:
            raise ValueError(damaged.format(problem))
        try:
            saved = _metadata_tree(m.item_metadata(step))
            target = {
                k: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), saved[k])
                for k in ("params", "batch_stats", "step")
            }
            as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), target)
            restored = m.restore(
                step,
                args=ocp.args.PyTreeRestore(
                    item=target, restore_args=as_numpy, partial_restore=True
                ),
            )
        except Exception as e:  # noqa: BLE001 - Orbax's errors for missing or bad files vary
            problem = f"restore failed ({type(e).__name__}: {str(e)[:300]})"
            raise ValueError(damaged.format(problem)) from e
    host = jax.tree.map(np.asarray, {k: restored[k] for k in ("params", "batch_stats")})
    return {**host, "step": int(restored["step"])}


def carry_over(state: dict, stage: Mapping[str, Any], carry: str, source: str) -> dict:
    """Puts a previous stage's weights into a freshly initialised state.

    Args:
      state: the new state (params/batch_stats with 'model' and 'head').
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
    parts = ("model", "head") if carry == "all" else ("model",)
    prefixes = tuple(f"{k}/{p}/" for k in ("params", "batch_stats") for p in parts)
    check_shapes(stage, state, source, prefixes)
    new = dict(state)
    for key in ("params", "batch_stats"):
        tree = dict(state[key])
        for part in parts:
            if part in stage[key]:
                tree[part] = jax.tree.map(
                    lambda old, loaded: jax.device_put(loaded.astype(old.dtype), old.sharding),
                    state[key][part],
                    stage[key][part],
                )
        new[key] = tree
    return new


def load_backbone_weights(state: dict, variables: Mapping[str, Any], source: str) -> dict:
    """Puts Keras-converted backbone variables under params/model/backbone.

    Raises:
      ValueError: a variable's shape differs from the model's backbone.
    """
    stage = {
        "params": {"model": {"backbone": variables["params"]}},
        "batch_stats": {"model": {"backbone": variables.get("batch_stats", {})}},
    }
    check_shapes(
        stage,
        {
            "params": {"model": {"backbone": state["params"]["model"]["backbone"]}},
            "batch_stats": {
                "model": {"backbone": state["batch_stats"]["model"].get("backbone", {})}
            },
        },
        source,
        ("params/model/backbone/", "batch_stats/model/backbone/"),
    )
    new = dict(state)
    for key in ("params", "batch_stats"):
        model = dict(state[key]["model"])
        model["backbone"] = jax.tree.map(
            lambda old, loaded: jax.device_put(np.asarray(loaded).astype(old.dtype), old.sharding),
            state[key]["model"]["backbone"],
            stage[key]["model"]["backbone"],
        )
        new[key] = {**state[key], "model": model}
    return new
