"""k-reciprocal re-ranking over global descriptors, from sparse neighbour lists.

Zhong, Zheng, Cao and Li, "Re-ranking Person Re-identification with
k-reciprocal Encoding", CVPR 2017; released code github.com/zhunzhong07/
person-re-ranking (python-version/re_ranking_feature, re_ranking_ranklist.py,
evaluation/utils/re_ranking.m). The released `re_ranking` works on all nodes,
queries first (0..Q-1) then index rows (Q..Q+N-1), and this module computes the
same quantities:

  * d(i, j) = ||x_i - x_j||^2, each row divided by its maximum over all nodes
    (the code divides by the column max and transposes: for a symmetric
    matrix the same); nodes are ranked by it, nearest first, itself included.
  * R(i, k) = the nodes f among i's k + 1 nearest that have i among their
    own k + 1 nearest.
  * R*(i) = R(i, k1) united with R(c, round(k1 / 2)) of every c in R(i, k1)
    (c = i included) for which |R(c, .) & R(i, k1)| > 2/3 |R(c, .)|
    (strictly; tested as 3 |&| > 2 |R(c)|, which agrees with the code's float
    test for every size up to 10^5). round is numpy's, half to even:
    int(np.around(k1 / 2)).
  * V[i, j] = exp(-d(i, j)) / sum over R*(i), for j in R*(i), else 0.
  * Local query expansion when k2 != 1: V[i] = mean of V over i's k2 nearest
    nodes (i itself included).
  * jaccard(p, g) = 1 - m / (2 - m), m = sum_j min(V[p, j], V[g, j]) over all
    nodes j (the paper's 1 - sum min / sum max, since every row sums to 1).
  * final(p, g) = (1 - lambda) jaccard(p, g) + lambda d(p, g).

Dense, that is (Q + N)^2 numbers; here nothing of that size is formed. Every
node's nearest nodes come from knn.search (each node against the index and
against the queries, the two lists merged with the node itself), the row
maximum of a unit vector x from one 1-nearest-neighbour search with -x
(max_y ||x - y||^2 = 4 - min_y ||-x - y||^2), V is stored sparse for the nodes
the requested pairs reach, and the final distance is computed only for each
query's candidates. Given exact neighbour lists, every value equals the dense
algorithm's for that pair, so with all N candidates the result is the dense one.

Where this differs from the released code, and why:
  * Precision: the Python feature version casts features, distances, V and
    the Jaccard distance to float16 (re_ranking_ranklist.py and the MATLAB
    code use float32/single). Here the descriptors are float32 and every
    distance, weight and sum is float64 (returned as float32), because
    float16 ties and rounding reorder near neighbours at GLDv2's scale.
  * Ties: distances recomputed in float64 order each list, equal ones by node
    number (a stable sort); the code's argsort is quicksort.
  * round(k1 / 2): the Python code's half-to-even rounding is followed; the
    MATLAB code takes round((k1 + 1) / 2) nearest, one fewer for k1 = 3, 7, 11...
  * A node at distance 0 from every node has row maximum 0: its normalised
    distances are 0 here, NaN in the code.
  * Approximate search (ScaNN) may return short lists (-1): missing entries
    are skipped, and a query expansion averages the rows that exist.
  * Only each query's candidates are scored; the code scores every pair.
"""

from __future__ import annotations

import numpy as np

from landmark_jax.retrieval import exact_search, knn

__all__ = ["k_reciprocal_rerank"]

# Node rows whose R* sets are formed at once ([rows, k, h, k] booleans).
NODES_PER_CHUNK = 1024
# (query, candidate) pairs scored at once, and descriptor pairs per distance block.
PAIRS_PER_CHUNK = 32768
_DISTANCE_BLOCK = 8192
# Unit rows: squared norms within this of 1 (the farthest-point identity needs it).
_UNIT_TOLERANCE = 1e-4


def _gather(queries: np.ndarray, index: np.ndarray, nodes: np.ndarray) -> np.ndarray:
    out = np.empty((len(nodes), queries.shape[1]), np.float32)
    is_query = nodes < len(queries)
    out[is_query] = queries[nodes[is_query]]
    out[~is_query] = index[nodes[~is_query] - len(queries)]
    return out


def _sq_distances(queries, index, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """float64 ||x_a - x_b||^2 for node pairs (inf where either is -1)."""
    a, b = a.ravel(), b.ravel()
    out = np.full(len(a), np.inf)
    pairs = np.flatnonzero((a >= 0) & (b >= 0))
    for start in range(0, len(pairs), _DISTANCE_BLOCK):
        p = pairs[start : start + _DISTANCE_BLOCK]
        diff = np.subtract(
            _gather(queries, index, a[p]), _gather(queries, index, b[p]), dtype=np.float64
        )
        out[p] = np.einsum("pd,pd->p", diff, diff)
    return out


def _normalise(distances: np.ndarray, maxima: np.ndarray) -> np.ndarray:
    return np.divide(distances, maxima, out=np.zeros_like(distances), where=maxima > 0)


def _neighbour_lists(queries, index, width, index_search, index_neighbors=None):
    """Each node's `width` nearest nodes (node numbers, -1 none) and row maximum.

    `index_search` searches `index`; the queries get a search of their own,
    each built once for its two searches (nearest, and farthest as the
    nearest to -x)."""
    num_q, num_nodes = len(queries), len(queries) + len(index)
    query_search = knn.IndexSearch(queries, index_search.backend)
    nodes = np.concatenate([queries, index])
    _, from_queries = query_search.search(nodes, min(width, num_q))
    k_index = min(width, len(index))
    if index_neighbors is None:
        _, from_index = index_search.search(nodes, k_index)
    else:
        _, from_index = index_search.search(queries, k_index)
        from_index = np.concatenate([from_index, index_neighbors[:, :k_index]])
    np.negative(nodes, out=nodes)  # farthest from x = nearest to -x
    far = [search.search(nodes, 1)[1][:, 0] for search in (query_search, index_search)]
    del nodes
    ids = np.arange(num_nodes)
    far_index = np.where(far[1] >= 0, far[1] + num_q, -1)
    maxima = np.zeros(num_nodes)
    for farthest in (far[0], far_index):  # -1 (none found) gives inf: skipped
        found = _sq_distances(queries, index, ids, farthest)
        maxima = np.maximum(maxima, np.where(np.isfinite(found), found, 0.0))
    lists = np.empty((num_nodes, width), np.int64)
    for start in range(0, num_nodes, NODES_PER_CHUNK):
        rows = ids[start : start + NODES_PER_CHUNK]
        pool = np.concatenate(
            [rows[:, None], np.where(from_index[rows] >= 0, from_index[rows] + num_q, -1)]
            + [from_queries[rows]],
            axis=1,
        )
        pool = np.sort(pool, axis=1)
        pool[:, 1:][pool[:, 1:] == pool[:, :-1]] = -1  # each node once
        rep = np.repeat(rows, pool.shape[1])
        dist = _sq_distances(queries, index, rep, pool).reshape(pool.shape)
        key = _normalise(dist, maxima[rows, None])
        key[pool < 0] = np.inf
        order = np.lexsort((pool, key), axis=1)[:, :width]
        lists[rows] = np.take_along_axis(pool, order, axis=1)
    return lists, maxima


def _reciprocal(lists: np.ndarray, nodes: np.ndarray, k: int) -> np.ndarray:
    """R(i, k - 1) of each node, in its list's order, -1 where not reciprocal."""
    forward = lists[nodes, :k]
    backward = lists[np.maximum(forward, 0), :k]
    hit = (forward >= 0) & (nodes >= 0)[:, None] & (backward == nodes[:, None, None]).any(-1)
    return np.where(hit, forward, -1)


def _unique_rows(sets: np.ndarray) -> np.ndarray:
    big = np.iinfo(np.int64).max
    s = np.sort(np.where(sets < 0, big, sets), axis=1)
    s[:, 1:][s[:, 1:] == s[:, :-1]] = big
    s = np.sort(s, axis=1)
    s = s[:, : max(1, int((s < big).sum(1).max(initial=0)))]
    return np.where(s == big, -1, s)


def _expanded_sets(lists: np.ndarray, nodes: np.ndarray, k1: int) -> np.ndarray:
    """R*(i) of each node, ascending node numbers, -1 padded."""
    num_nodes = len(lists)
    k, h = min(k1 + 1, num_nodes), min(int(np.around(k1 / 2)) + 1, num_nodes)
    r = _reciprocal(lists, nodes, k)  # [n, k]
    rc = _reciprocal(lists, r.ravel(), h).reshape(len(nodes), k, h)
    size = (rc >= 0).sum(-1)
    common = ((rc[..., None] == r[:, None, None, :]) & (rc >= 0)[..., None]).any(-1).sum(-1)
    take = (r >= 0) & (3 * common > 2 * size)
    extra = np.where(take[..., None], rc, -1).reshape(len(nodes), k * h)
    return _unique_rows(np.concatenate([r, extra], axis=1))


def _encode(queries, index, lists, maxima, nodes, k1):
    """V's rows for `nodes`, CSR: (indptr, columns ascending, float64 values)."""
    indptr, cols, vals = [np.zeros(1, np.int64)], [], []
    for start in range(0, len(nodes), NODES_PER_CHUNK):
        chunk = nodes[start : start + NODES_PER_CHUNK]
        sets = _expanded_sets(lists, chunk, k1)
        row, slot = np.nonzero(sets >= 0)
        members = sets[row, slot]
        dist = _sq_distances(queries, index, chunk[row], members)
        weight = np.exp(-_normalise(dist, maxima[chunk[row]]))
        total = np.bincount(row, weight, minlength=len(chunk))
        indptr.append(indptr[-1][-1] + np.cumsum(np.bincount(row, minlength=len(chunk))))
        cols.append(members.astype(np.int32))
        vals.append(weight / total[row])
    return np.concatenate(indptr), np.concatenate(cols), np.concatenate(vals)


def _row_entries(indptr: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(which of `rows` owns each entry, the entry's position) of CSR rows."""
    starts, lengths = indptr[rows], indptr[rows + 1] - indptr[rows]
    owner = np.repeat(np.arange(len(rows)), lengths)
    offsets = np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    return owner, np.repeat(starts, lengths) + offsets


def _query_expanded(encoding, position, lists, rows, k2):
    """V after local query expansion for `rows`, CSR by (key = row * M + column)."""
    indptr, cols, vals = encoding
    num_nodes = len(lists)
    sources = rows[:, None] if k2 == 1 else lists[rows, : min(k2, num_nodes)]
    row, slot = np.nonzero(sources >= 0)
    owner, entry = _row_entries(indptr, position[sources[row, slot]])
    keys = row[owner] * num_nodes + cols[entry]
    keys, inverse = np.unique(keys, return_inverse=True)
    sums = np.bincount(inverse, vals[entry], minlength=len(keys))
    counts = np.bincount(row, minlength=len(rows))
    return keys, sums / counts[keys // num_nodes]


def _check_unit(name: str, x: np.ndarray) -> None:
    bad = np.flatnonzero(np.abs(np.einsum("nd,nd->n", x, x) - 1.0) > _UNIT_TOLERANCE)
    if bad.size:
        raise ValueError(f"{name} must have unit (L2-normalised) rows; row {bad[0]} does not")


def k_reciprocal_rerank(
    queries: np.ndarray,
    index: np.ndarray,
    candidates: np.ndarray,
    k1: int,
    k2: int,
    lambda_value: float,
    backend: str,
    index_neighbors: np.ndarray | None = None,
    *,
    index_search: knn.IndexSearch | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """k-reciprocal re-ranking (Zhong et al. 2017) of each query's candidates.

    Args:
      queries: [Q, D] unit rows.
      index: [N, D] unit rows.
      candidates: [Q, L] each query's index rows from the first search, best
        first (-1 = none).
      k1: the k of the k-reciprocal sets R(i, k1), >= 1 (paper: 20).
      k2: neighbours averaged by the local query expansion, >= 1; 1 skips it
        (paper: 6).
      lambda_value: weight of the original distance, in [0, 1] (paper: 0.3).
      backend: knn.search's backend for the neighbour lists (knn.BACKENDS).
      index_neighbors: [N, >= min(max(k1 + 1, k2), N)] each index row's
        nearest index rows, itself included, best first (-1 = none); searched
        when None.
      index_search: a knn.IndexSearch over `index` with `backend`, its
        ScaNN searcher reused (None: one is made here).

    Returns:
      (distances [Q, L] float32 ascending, candidates [Q, L] int64 in that
      order): the final distance of each candidate; -1 candidates come last
      at distance inf. Ties keep the candidates' order.

    Raises:
      ValueError: k1 or k2 below 1, lambda_value outside [0, 1], an unknown
        backend, arrays of the wrong shape, dtype or range, non-unit rows,
        an index_search of another index or backend.
    """
    for name, value in (("k1", k1), ("k2", k2)):
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    if not 0.0 <= lambda_value <= 1.0:
        raise ValueError(f"lambda_value must be in [0, 1], got {lambda_value!r}")
    if backend not in knn.BACKENDS:
        raise ValueError(f"backend={backend!r} is not one of {knn.BACKENDS}")
    queries = exact_search.check_matrix("queries", queries)
    index = exact_search.check_matrix("index", index)
    if queries.shape[1] != index.shape[1]:
        raise ValueError(f"queries have {queries.shape[1]} dims, index has {index.shape[1]}")
    _check_unit("queries", queries)
    _check_unit("index", index)
    num_q, num_index = len(queries), len(index)
    num_nodes = num_q + num_index
    width = min(max(k1 + 1, k2), num_nodes)
    candidates = _check_ids("candidates", candidates, (num_q, None), num_index)
    if index_neighbors is not None:
        index_neighbors = _check_ids(
            "index_neighbors", index_neighbors, (num_index, min(width, num_index)), num_index
        )

    if index_search is None:
        index_search = knn.IndexSearch(index, backend)
    elif index_search.index.shape != index.shape or index_search.backend not in (backend, "exact"):
        raise ValueError(
            f"index_search searches a {index_search.index.shape} index with "
            f"{index_search.backend!r}, not this {index.shape} index with {backend!r}"
        )
    lists, maxima = _neighbour_lists(queries, index, width, index_search, index_neighbors)
    valid = candidates >= 0
    needed = np.concatenate([np.arange(num_q), num_q + np.unique(candidates[valid])])
    sources = needed if k2 == 1 else np.unique(lists[needed, : min(k2, num_nodes)])
    sources = sources[sources >= 0]
    encoding = _encode(queries, index, lists, maxima, sources, k1)
    position = np.full(num_nodes, -1, np.int64)
    position[sources] = np.arange(len(sources))

    num_l = candidates.shape[1]
    out_d = np.full((num_q, num_l), np.inf, np.float32)
    out_c = np.full((num_q, num_l), -1, np.int64)
    step = max(1, PAIRS_PER_CHUNK // max(num_l, 1))
    for start in range(0, num_q, step):
        qs = np.arange(start, min(start + step, num_q))
        cand = candidates[qs]
        qi, li = np.nonzero(cand >= 0)
        g = cand[qi, li] + num_q
        g_nodes = np.unique(g)
        rows = np.concatenate([qs, g_nodes])
        keys, values = _query_expanded(encoding, position, lists, rows, k2)
        # Each pair's candidate entries, looked up among its query's entries.
        bounds = np.searchsorted(keys, np.arange(len(rows) + 1) * num_nodes)
        pair_rows = len(qs) + np.searchsorted(g_nodes, g)
        owner, entry = _row_entries(bounds, pair_rows)
        lookup = qi[owner] * num_nodes + keys[entry] % num_nodes
        at = np.minimum(
            np.searchsorted(keys[: bounds[len(qs)]], lookup), max(bounds[len(qs)] - 1, 0)
        )
        hit = keys[at] == lookup if len(at) else np.zeros(0, bool)
        common = np.where(hit, np.minimum(values[at], values[entry]), 0.0)
        m = np.bincount(owner, common, minlength=len(g))
        jaccard = 1.0 - m / (2.0 - m)
        original = _normalise(_sq_distances(queries, index, qs[qi], g), maxima[qs[qi]])
        final = np.full(cand.shape, np.inf)
        final[qi, li] = (1.0 - lambda_value) * jaccard + lambda_value * original
        order = np.argsort(final, axis=1, kind="stable")
        out_d[qs] = np.take_along_axis(final, order, axis=1)
        out_c[qs] = np.take_along_axis(cand, order, axis=1)
    return out_d, out_c


def _check_ids(name: str, ids, shape: tuple[int, int | None], num_rows: int) -> np.ndarray:
    ids = np.asarray(ids)
    if ids.ndim != 2 or ids.shape[0] != shape[0] or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(
            f"{name} must be an integer [{shape[0]}, ...] array, got {ids.dtype} {ids.shape}"
        )
    if shape[1] is not None and ids.shape[1] < shape[1]:
        raise ValueError(f"{name} needs at least {shape[1]} columns, got shape {ids.shape}")
    if ids.size and (ids.min() < -1 or ids.max() >= num_rows):
        raise ValueError(
            f"{name} must hold index rows in [0, {num_rows}) or -1, got {ids.min()}..{ids.max()}"
        )
    return ids.astype(np.int64)
