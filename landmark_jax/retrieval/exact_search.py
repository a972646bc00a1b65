"""Exact k-nearest-neighbour search by squared L2 on the accelerator.

`exact_search` computes matmul + `jax.lax.top_k` on the local devices,
streamed over index chunks with a running top-k, so a 762k x 512 index (or a
4M-image train set for recognition) never materialises a [Q, N] matrix nor
even has to fit on the device. It is the oracle for ScaNN's recall and the
fallback when ScaNN cannot be imported (see `knn`).

This module also holds the input validation shared by every kNN engine
(`check_matrix`, `check_pair`, `check_k`); `knn` uses it from here, so
there is one copy and no import cycle.

Returns `(distances, indices)`: float32 squared L2 distances, ascending, and
int64 row numbers of the index, each [Q, k].
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from landmark_jax.runtime import sharding

# ----------------------------------------------------------------- validation


def check_matrix(name: str, x: Any) -> np.ndarray:
    """float32 [rows, dim] with at least one row, one column, and finite values."""
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"{name} must be a 2-D [rows, dim] array, got shape {x.shape}")
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"{name} is empty (shape {x.shape}); nothing to search")
    x = np.ascontiguousarray(x, dtype=np.float32)
    # A float64 row sum propagates NaN/inf without an [N, D] boolean temporary
    # (390 MB for the GLDv2 index) and cannot overflow for float32 inputs.
    bad = np.flatnonzero(~np.isfinite(x.sum(axis=1, dtype=np.float64)))
    if bad.size:
        raise ValueError(
            f"{name} has {bad.size} row(s) with NaN or inf values, first at row {bad[0]}"
        )
    return x


def check_pair(queries: Any, index: Any, k: int) -> tuple[np.ndarray, np.ndarray]:
    queries = check_matrix("queries", queries)
    index = check_matrix("index", index)
    if queries.shape[1] != index.shape[1]:
        raise ValueError(
            f"dimension mismatch: queries have {queries.shape[1]} dims, "
            f"the index has {index.shape[1]}"
        )
    check_k(k, index.shape[0])
    return queries, index


def check_k(k: int, num_points: int) -> None:
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    if k > num_points:
        raise ValueError(f"k={k} is larger than the index, which has N={num_points} points")


# --------------------------------------------------------------- exact search


@functools.partial(jax.jit, static_argnames=("k", "recall_target"))
def _merge_chunk(
    best_scores, best_ids, queries, chunk, offset, num_valid, *, k, recall_target=None
):
    """Folds one index chunk into the running top-k of a query chunk.

    Scores are 2 q.x - ||x||^2 = ||q||^2 - ||q - x||^2: the same ranking as the
    distance, with the per-query constant added back on the host. With a
    recall_target, the chunk's candidates come from `lax.approx_max_k`.
    """
    dots = jnp.matmul(queries, chunk.T, precision=jax.lax.Precision.HIGHEST)
    scores = 2.0 * dots - jnp.sum(chunk * chunk, axis=1)[None, :]
    columns = jnp.arange(chunk.shape[0], dtype=jnp.int32)
    # The padded tail of the last chunk can never enter the top-k.
    scores = jnp.where(columns[None, :] < num_valid, scores, -jnp.inf)
    if recall_target is not None and scores.shape[1] > k:
        # TPU's partial reduction: the chunk's k best with the expected recall
        # (a chunk of at most k rows is all candidates anyway).
        scores, chunk_pos = jax.lax.approx_max_k(scores, k, recall_target=recall_target)
    else:
        chunk_pos = jnp.broadcast_to(columns, scores.shape)
    # Running results go first: top_k puts the lower position first on ties, and
    # every running index is lower than every index of this chunk.
    top, pos = jax.lax.top_k(jnp.concatenate([best_scores, scores], axis=1), k)
    from_best = jnp.take_along_axis(best_ids, jnp.minimum(pos, k - 1), axis=1)
    from_chunk = jnp.take_along_axis(chunk_pos, jnp.maximum(pos - k, 0), axis=1)
    return top, jnp.where(pos < k, from_best, offset + from_chunk)


def exact_search(
    queries: np.ndarray,
    index: np.ndarray,
    k: int,
    *,
    index_chunk: int = 65536,
    query_chunk: int = 1024,
    devices: Sequence[jax.Device] | None = None,
    recall_target: float | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact k nearest neighbours by squared L2, on the accelerator.

    Distances are the true ||q||^2 + ||x||^2 - 2 q.x, so inputs need not be
    normalised; for unit vectors this is 2 - 2 <q, x>. The dot products run at
    HIGHEST precision (no bf16/TF32 passes), since this is the reference that
    approximate search is measured against. Rounding can make a distance
    slightly negative; it is clamped at 0.

    The index is streamed in chunks of `index_chunk` rows (each moved to the
    devices once); every query chunk keeps a running top-k, so memory is
    O(query_chunk * index_chunk) for scores, never O(Q * N). Query chunks are
    split over `devices` (data parallel). Chunks hold a power of two of rows
    (at most the chunk sizes asked for), the last index chunk padded, so
    searches of different sizes share the jitted step's compiled programs.

    Ties: equal computed scores come back lower index first (`lax.top_k` is
    stable and earlier chunks are merged first). Distances that are equal in
    exact arithmetic but differ in float rounding (accumulation order is up to
    the backend's matmul) are ordered by their rounded values.

    Args:
      queries: [Q, D] query embeddings.
      index: [N, D] database embeddings.
      k: neighbours per query, 1 <= k <= N.
      index_chunk: index rows per step; bounds the [query_chunk, index_chunk]
        score matrix.
      query_chunk: queries per step, rounded up to a multiple of the device
        count.
      devices: devices to split query chunks over; default this process's
        local devices.
      recall_target: None for exact search; a value in (0, 1) takes each
        chunk's candidates with `jax.lax.approx_max_k` at that expected
        recall (TPU's fast top-k; on CPU and GPU XLA computes it exactly).

    Returns:
      (distances [Q, k] float32 ascending, indices [Q, k] int64).

    Raises:
      ValueError: empty inputs, NaN/inf rows, mismatched dimensions, k < 1 or
        k > N, non-positive chunk sizes, a recall_target outside (0, 1).
    """
    queries, index = check_pair(queries, index, k)
    if recall_target is not None and not 0.0 < recall_target < 1.0:
        raise ValueError(f"recall_target must be in (0, 1) or None, got {recall_target!r}")
    if index_chunk < 1 or query_chunk < 1:
        raise ValueError(
            f"index_chunk and query_chunk must be positive, got {index_chunk}, {query_chunk}"
        )
    num_queries, num_points = queries.shape[0], index.shape[0]
    if num_points >= 2**31:
        raise ValueError(f"the index has N={num_points} rows; int32 positions allow < 2**31")
    mesh = sharding.create_mesh(jax.local_devices() if devices is None else devices)
    num_devices = mesh.devices.size
    data = sharding.batch_sharding(mesh)
    replicated = sharding.replicated_sharding(mesh)

    # Chunk shapes rounded up to powers of two (within the chunk sizes asked
    # for): searches of different sizes (splits, re-ranking steps, a growing
    # index) share compiled steps; the padding is masked or dropped.
    ic = min(index_chunk, _power_of_two_at_least(num_points))
    qc = min(query_chunk, _power_of_two_at_least(num_queries))
    qc = -(-qc // num_devices) * num_devices
    q_starts = range(0, num_queries, qc)
    # All query chunks go to the devices up front: queries and the running top-k
    # are small next to the index, which is what gets streamed.
    q_dev, best = [], []
    for start in q_starts:
        q_dev.append(jax.device_put(pad_rows(queries[start : start + qc], qc), data))
        best.append(
            (
                jax.device_put(np.full((qc, k), -np.inf, np.float32), data),
                jax.device_put(np.full((qc, k), -1, np.int32), data),
            )
        )
    for offset in range(0, num_points, ic):
        chunk = index[offset : offset + ic]
        chunk_dev = jax.device_put(pad_rows(chunk, ic), replicated)
        # Dispatch is asynchronous: without this wait the loop would queue the
        # whole index onto the devices. Waiting for the previous chunk's work
        # keeps at most two chunks there while still overlapping transfer and
        # compute.
        jax.block_until_ready(best)
        for i, q in enumerate(q_dev):
            best[i] = _merge_chunk(
                *best[i], q, chunk_dev, offset, chunk.shape[0], k=k, recall_target=recall_target
            )

    scores = np.concatenate([np.asarray(s) for s, _ in best])[:num_queries]
    ids = np.concatenate([np.asarray(i) for _, i in best])[:num_queries]
    q_sq = np.sum(queries * queries, axis=1, dtype=np.float32)[:, None]
    distances = np.maximum(q_sq - scores, 0.0).astype(np.float32)
    return distances, ids.astype(np.int64)


def _power_of_two_at_least(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def pad_rows(x: np.ndarray, rows: int) -> np.ndarray:
    """x with zero rows appended to `rows` rows (a jitted step's fixed shape)."""
    if x.shape[0] == rows:
        return x
    return np.concatenate([x, np.zeros((rows - x.shape[0], *x.shape[1:]), x.dtype)])
