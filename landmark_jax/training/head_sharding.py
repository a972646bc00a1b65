"""Sharding of the cosine head's class dimension across devices.

The kernel of a large head (203,094 classes, 104M parameters) is split along
its class axis, so that no device holds the whole head:

- `padded_num_classes` rounds the class count up so every device holds the
  same whole number of classes (the classifier gives the padded classes a
  sentinel cosine, see `heads`); training pads to a multiple of 1024
  (`portable_num_classes`) so checkpoints restore on any device count that
  divides it.
- `param_shardings` places the head kernel as P(None, 'data'), every other
  parameter (and the matching optimizer state) replicated: the trainer's
  whole train state goes through it.

Under `jax.jit` the matmul, the max over sub-centers, the margin and the
cross-entropy's logsumexp are then computed on each device's slice of classes,
with only [B]-sized reductions crossing devices. Set `CosineClassifier.mesh`
so the embeddings are all-gathered (small) rather than the kernel (large).
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from landmark_jax.runtime.sharding import DATA_AXIS
from landmark_jax.training.heads import KERNEL_KEY

HEAD_KEY = "head"

# The trainer pads the class count for this many shards (times 8), whatever
# the device count of the run: a checkpoint's head then restores on any
# number of devices that divides 1024 (1 CPU, 8 TPU cores, a 128-chip pod).
PORTABLE_NUM_SHARDS = 128


def padded_num_classes(num_classes: int, num_shards: int, per_shard_multiple: int = 8) -> int:
    """Rounds C up to a multiple of num_shards * per_shard_multiple.

    Every shard of the class axis then holds the same whole number of classes
    (with all their sub-centers, by the class-major layout), a multiple of
    `per_shard_multiple` for aligned per-device tiles.

    The result depends on num_shards, and so does the kernel shape saved in a
    checkpoint: pass the same num_shards (e.g. a fixed 8, or a multiple of
    every device count you will use) to resume on a different device count.

    Args:
      num_classes: real C >= 1.
      num_shards: devices the class axis is split over (>= 1).
      per_shard_multiple: alignment of each shard's class count (>= 1).

    Returns:
      C_padded >= C.

    Raises:
      ValueError: an argument below 1.
    """
    if min(num_classes, num_shards, per_shard_multiple) < 1:
        raise ValueError(
            f"num_classes={num_classes}, num_shards={num_shards} and "
            f"per_shard_multiple={per_shard_multiple} must all be >= 1"
        )
    unit = num_shards * per_shard_multiple
    return -(-num_classes // unit) * unit


def portable_num_classes(num_classes: int) -> int:
    """C padded to a multiple of 1024: the head shape of every training run.

    Raises:
      ValueError: num_classes < 1.
    """
    return padded_num_classes(num_classes, PORTABLE_NUM_SHARDS)


def _is_head_kernel(path: tuple[Any, ...]) -> bool:
    """True for a key path ending in ('head', 'kernel').

    Matching the suffix also catches the kernel inside an optimizer state
    (e.g. momentum 'trace') or a {'params': ...} wrapper.
    """
    names = [getattr(k, "key", getattr(k, "name", None)) for k in path]
    return len(names) >= 2 and names[-2:] == [HEAD_KEY, KERNEL_KEY]


def param_shardings(params: Any, mesh: Mesh, shard_head: bool) -> Any:
    """NamedShardings for a parameter (or optimizer-state) pytree.

    The head kernel (path ending in 'head', 'kernel', i.e.
    params['head']['kernel']) gets P(None, 'data') when shard_head, so no device
    holds the whole head; everything else is replicated (P()).

    Args:
      params: pytree of arrays or jax.ShapeDtypeStruct (e.g. from
        jax.eval_shape); the trainer's model keeps the head under 'head' and
        the embedding model under 'model'.
      mesh: device mesh with a 'data' axis.
      shard_head: shard the head kernel's class axis; False replicates all.

    Returns:
      A pytree of NamedSharding with the structure of `params`.

    Raises:
      ValueError: the mesh has no 'data' axis, or the kernel's last dimension
        is not divisible by the 'data' axis size (pad with
        `padded_num_classes`).
    """
    if DATA_AXIS not in mesh.axis_names:
        raise ValueError(f"mesh axes {mesh.axis_names} have no {DATA_AXIS!r} axis")
    num_shards = mesh.shape[DATA_AXIS]
    replicated = NamedSharding(mesh, P())
    class_sharded = NamedSharding(mesh, P(None, DATA_AXIS))

    def choose(path: tuple[Any, ...], leaf: Any) -> NamedSharding:
        if not (shard_head and _is_head_kernel(path)):
            return replicated
        shape = np.shape(leaf) if not hasattr(leaf, "shape") else leaf.shape
        if len(shape) != 2 or shape[-1] % num_shards:
            raise ValueError(
                f"head kernel {jax.tree_util.keystr(path)} of shape {tuple(shape)} cannot be "
                f"split over {num_shards} devices: its last dimension (classes * sub-centers) "
                "must be a multiple of the device count; set num_classes_padded = "
                "padded_num_classes(num_classes, num_devices)"
            )
        return class_sharded

    return jax.tree_util.tree_map_with_path(choose, params)
