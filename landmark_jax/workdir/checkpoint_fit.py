"""Does a checkpoint fit the model and optimizer of this config?

Orbax neither names the parameter on a shape mismatch nor refuses to pad
when asked to be lenient, and its "tree structures do not match" names no
config key. So every restore is preceded by these comparisons against the
checkpoint's metadata: `check_shapes` names each parameter, both shapes and
the config keys that decide that shape; `check_structure` names the arrays
only one side has (another optimizer, clipping, weight decay); both list the
config keys changed since the checkpoint was written.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
from flax import traverse_util

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
    saved: Mapping[str, Any],
    expected: Mapping[str, Any],
    source: str,
    prefixes: tuple[str, ...],
    changes: Sequence[str] = (),
) -> None:
    """Compares parameter shapes of a checkpoint with the model's.

    Args:
      saved: the checkpoint's metadata tree (or arrays) with 'params' and
        'batch_stats'.
      expected: the abstract (or real) state of the current model.
      source: the checkpoint path, for the message.
      prefixes: the flattened paths to compare, e.g. ('params/model/',).
      changes: 'key: old -> new' lines of the config keys that changed since
        the checkpoint was written, named in the message.

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
            + _changes_text(changes)
        )


def _path_of(keys: tuple) -> str:
    parts = []
    for key in keys:
        for attr in ("key", "idx", "name"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
    return "/".join(parts)


def _leaf_paths(tree: Any) -> set[str]:
    leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: hasattr(x, "shape"))[0]
    return {_path_of(keys) for keys, _ in leaves}


def check_structure(saved: Any, expected: Any, source: str, changes: Sequence[str] = ()) -> None:
    """Compares the arrays a checkpoint holds with those the state needs.

    Orbax's own error ("tree structures do not match") names neither the
    config key nor what changed; another optimizer (adam's mu/nu for sgd's
    trace), gradient clipping or weight decay changes the optimizer state's
    arrays without changing any parameter shape.

    Args:
      saved: the checkpoint's metadata tree.
      expected: the abstract state of the current config.
      source: the checkpoint path, for the message.
      changes: 'key: old -> new' lines of the config keys that changed since
        the checkpoint was written (run_config.changes_since_checkpoint).

    Raises:
      ValueError: naming the arrays only one side has, and the changed keys.
    """
    got, want = _leaf_paths(saved), _leaf_paths(expected)
    if got == want:
        return
    lines = [f"  {p}: in the checkpoint, not in this config's state" for p in sorted(got - want)]
    lines += [f"  {p}: in this config's state, not in the checkpoint" for p in sorted(want - got)]
    raise ValueError(
        f"checkpoint {source} does not fit this config (a config error, not damage: the "
        "checkpoint is left as it is):\n"
        + "\n".join(lines[:12])
        + (f"\n  ... and {len(lines) - 12} more" if len(lines) > 12 else "")
        + _changes_text(changes)
    )


def _changes_text(changes: Sequence[str]) -> str:
    if not changes:
        return ""
    return (
        "\nconfig keys changed since the checkpoint was written (its workdir's config.json "
        "-> this config):\n  "
        + "\n  ".join(changes)
        + "\nresume with the recorded values, or train this config in a new workdir"
    )
