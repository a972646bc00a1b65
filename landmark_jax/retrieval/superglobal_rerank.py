"""SuperGlobal's re-ranking with global descriptors: eval.rerank's `superglobal(m, k, beta)`.

The re-ranking of SuperGlobal (Shao, Chen, Karpur, Cui, Araujo, Cao, "Global
Features are All You Need for Image Retrieval and Reranking", ICCV 2023), as
its released code does it
(modules/reranking/MDescAug.py and RerankwMDA.py; defaults M=400, K=9,
beta=0.15): for each query, each of its top-m candidates c_i is
replaced by the weighted mean of itself (weight 1) and its k nearest
fellow candidates c_j (weights beta * c_i . c_j); the candidates are
ordered by q . mean_i; the element-wise maximum of the first k + 1
means in that order is the refined query q', and the final score of a
candidate is (q . mean_i + q' . mean_i) / 2. Candidates keep their
order below the top m. Where the code and the paper differ, this follows
the code: the means are not normalised; the weights are the raw
similarities times beta (not clipped at 0); RerankwMDA scales the top
k + 1 scores by beta and never uses them, so nothing here does.
"""

from __future__ import annotations

import numpy as np

# Rows whose [m, m] similarities are formed at once: ROWS_PER_CHUNK // m queries.
ROWS_PER_CHUNK = 8192


def superglobal_rerank(
    queries: np.ndarray,
    index: np.ndarray,
    neighbors: np.ndarray,
    m: int,
    k: int,
    beta: float,
    distances: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """SuperGlobal's re-ranking of each query's top-m candidates (the module
    docstring: MDescAug, then RerankwMDA, as the released code computes them).

    Args:
      queries: [Q, D] unit queries.
      index: [N, D] unit index rows.
      neighbors: [Q, >= m'] each query's candidates, best first (m' =
        min(m, N); the first m' are re-ranked, the rest keep their order).
      m: candidates re-ranked per query.
      k: fellow candidates averaged into each candidate's mean.
      beta: their weight's factor.
      distances: the candidates' squared L2 distances, when the search gave
        them: the similarities of the candidates below m' come from them
        instead of a product with their index rows (a whole-database
        ranking, as Revisited's, has N - m' of them per query).

    Returns:
      (scores [Q, L], neighbors [Q, L]): the candidates in their new order
      with their final scores (descending) for the top m', then the others
      with their plain similarities.
    """
    m = min(m, neighbors.shape[1])
    k = min(k + 1, m)  # +1: a candidate is its own nearest
    out_rows = np.empty_like(neighbors)
    out_scores = np.empty(neighbors.shape, np.float64)
    for start in range(0, len(queries), max(1, ROWS_PER_CHUNK // max(m, 1))):
        rows = slice(start, start + max(1, ROWS_PER_CHUNK // max(m, 1)))
        ids = neighbors[rows, :m]
        cand = index[ids].astype(np.float64)  # [r, m, D]
        # Batched products (matmul's BLAS; einsum would loop in numpy).
        sims = cand @ cand.transpose(0, 2, 1)  # [r, m, m]
        order = np.argsort(-sims, axis=-1, kind="stable")[..., :k]  # [r, m, k]
        weights = np.take_along_axis(sims, order, axis=-1) * beta
        weights[..., 0] = 1.0
        # The weights as an [r, m, m] matrix (k entries a row), so the means
        # are one product and no [r, m, k, D] copy of the candidates is made.
        mixing = np.zeros(sims.shape)
        np.put_along_axis(mixing, order, weights, axis=-1)
        means = (mixing @ cand) / weights.sum(-1, keepdims=True)
        q = queries[rows].astype(np.float64)
        first = (means @ q[:, :, None])[..., 0]  # q . mean_i
        by_first = np.argsort(-first, axis=-1, kind="stable")
        first_sorted = np.take_along_axis(first, by_first, axis=-1)
        means_sorted = np.take_along_axis(means, by_first[..., None], axis=1)
        refined = means_sorted[:, :k].max(axis=1)  # [r, D]
        final = (first_sorted + (means_sorted @ refined[:, :, None])[..., 0]) / 2.0
        by_final = np.argsort(-final, axis=-1, kind="stable")
        new_ids = np.take_along_axis(np.take_along_axis(ids, by_first, -1), by_final, -1)
        out_rows[rows, :m] = new_ids
        out_scores[rows, :m] = np.take_along_axis(final, by_final, axis=-1)
        rest = neighbors[rows, m:]
        out_rows[rows, m:] = rest
        if distances is not None:
            out_scores[rows, m:] = 1.0 - distances[rows, m:].astype(np.float64) / 2.0
        else:
            rest_rows = index[np.maximum(rest, 0)].astype(np.float64)  # [r, L - m, D]
            out_scores[rows, m:] = (rest_rows @ q[:, :, None])[..., 0]
    return out_scores, out_rows
