"""Re-ranking by global descriptors alone: query expansion, DBA, SuperGlobal, k-reciprocal.

Steps of `eval.rerank`, applied in order after the first kNN search; each
is a pure function of descriptors and the neighbours a search found:

  * `alpha_qe(n, alpha)`, alpha query expansion (Radenović, Tolias and Chum,
    "Fine-tuning CNN Image Retrieval with No Human Annotation", TPAMI 2018):
    a query q becomes the L2-normalised sum of itself and its n nearest index
    vectors x_i, each weighted by (q . x_i)^alpha; the index is searched again
    with it. alpha = 0 is average query expansion (Chum et al. 2007): q and
    its n neighbours averaged.
  * `dba(n, alpha)`, database-side augmentation (Arandjelović and Zisserman
    2012; Gordo et al. 2017; alpha-weighted as Radenović et al. 2018): every
    index vector becomes the L2-normalised sum of itself and its n nearest
    other index vectors, weighted the same way, once; queries (expanded or
    not) are then searched against the augmented index.

  * `superglobal(m, k, beta)`, the re-ranking of SuperGlobal (Shao, Chen,
    Karpur, Cui, Araujo, Cao, ICCV 2023) as its released code does it
    (retrieval/superglobal_rerank.py, where the code's departures from the
    paper are listed): each query's top-m candidates re-ordered by their
    k-neighbour means and a refined query.
  * `k_reciprocal(k1, k2, lambda)`, k-reciprocal re-ranking (Zhong, Zheng,
    Cao, Li, CVPR 2017; retrieval/k_reciprocal.py, as its released code
    computes it, queries and index rows all nodes of the graph): the k
    candidates of the ranking before it are re-ordered by
    (1 - lambda) Jaccard distance of their k-reciprocal encodings + lambda
    normalised distance; each keeps its distance for the steps after it.

In alpha_qe and dba, the vector's own weight is 1 (its similarity to itself, to any
power) and a neighbour's weight is max(similarity, 0)^alpha: a fractional
power of a negative cosine is undefined, and a neighbour pointing away from
the vector adds nothing to its direction. Vectors are unit rows, so the
squared L2 distance d the search returns gives the similarity 1 - d / 2.

The weighted sums stream over rows in chunks (ROWS_PER_CHUNK), so an index
of GLDv2's size (761,757 x 512 or 2,048) is augmented within the host
memory of its own copy; the searches are knn.search's (ScaNN, exact, or
approx_max_k on the accelerator), so DBA's self-search of the index uses
the evaluation's backend. Each index searched gets one knn.IndexSearch, so
ScaNN builds one searcher for the given index (the first stage, DBA's
self-search, the later searches until a dba) and one for an augmented one.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import time
from collections.abc import Callable, Sequence

import numpy as np

from landmark_jax.models import layers
from landmark_jax.retrieval import k_reciprocal, knn, superglobal_rerank

# Rows whose weighted sums are formed at once: n neighbours x D floats each.
ROWS_PER_CHUNK = 8192

_STEP = re.compile(r"^\s*(\w+)\s*\((.*)\)\s*$")


@dataclasses.dataclass(frozen=True)
class RerankStep:
    """One step of eval.rerank: its name and its numbers (STEP_ARGS)."""

    name: str
    n: int = 0
    alpha: float = 0.0
    m: int = 0
    k: int = 0
    beta: float = 0.0
    k1: int = 0
    k2: int = 0
    lambda_value: float = 0.0

    def label(self) -> str:
        args = ", ".join(
            f"{key}={getattr(self, _FIELDS.get(key, key)):g}" for key in STEP_ARGS[self.name]
        )
        return f"{self.name}({args})"


# Each step's arguments: the integers first, then the real numbers.
# The index's self-search of k neighbours per row (itself among them): a
# function of k returning (distances [N, >= k], neighbors [N, >= k]), so a
# caller can keep the answer (evaluation keeps it in the workdir).
IndexNeighbors = Callable[[int], tuple[np.ndarray, np.ndarray]]

STEP_ARGS = {
    "alpha_qe": ("n", "alpha"),
    "dba": ("n", "alpha"),
    "superglobal": ("m", "k", "beta"),
    "k_reciprocal": ("k1", "k2", "lambda"),
}
STEPS = tuple(STEP_ARGS)
_INTEGER_ARGS = ("n", "m", "k", "k1", "k2")
# An argument whose RerankStep field has another name (lambda is Python's).
_FIELDS = {"lambda": "lambda_value"}


def parse_step(spec: str) -> RerankStep:
    """'alpha_qe(n=2, alpha=3)', 'dba(n=1, alpha=3)',
    'superglobal(m=400, k=9, beta=0.15)' or 'k_reciprocal(k1=20, k2=6,
    lambda=0.3)' as a RerankStep.

    Raises:
      ValueError: another name (the valid ones listed), a missing, unknown
        or malformed argument, n, m, k, k1 or k2 below 1 (k must be below
        m), alpha, beta or lambda negative, lambda above 1; the message
        quotes `spec`.
    """
    match = _STEP.match(str(spec))
    if not match:
        raise ValueError(f"eval.rerank step {spec!r}: expected NAME(KEY=NUMBER, ...)")
    name, body = match.groups()
    if name not in STEPS:
        raise ValueError(f"eval.rerank step {spec!r}: unknown step {name!r}; valid: {STEPS}")
    args = {}
    for part in filter(None, (p.strip() for p in body.split(","))):
        key, _, value = part.partition("=")
        try:
            args[key.strip()] = float(value)
        except ValueError:
            raise ValueError(f"eval.rerank step {spec!r}: {part!r} is not KEY=NUMBER") from None
    wanted = STEP_ARGS[name]
    if set(args) != set(wanted):
        raise ValueError(
            f"eval.rerank step {spec!r}: needs exactly {', '.join(k + '=' for k in wanted)} "
            f"got {sorted(args)}"
        )
    for key, value in args.items():
        if key in _INTEGER_ARGS and (value != int(value) or value < 1):
            raise ValueError(f"eval.rerank step {spec!r}: {key} must be an integer >= 1")
        if not (np.isfinite(value) and value >= 0):
            raise ValueError(f"eval.rerank step {spec!r}: {key} must be >= 0")
    if name == "superglobal" and args["k"] >= args["m"]:
        raise ValueError(f"eval.rerank step {spec!r}: k must be below m")
    if name == "k_reciprocal" and args["lambda"] > 1:
        raise ValueError(f"eval.rerank step {spec!r}: lambda must be within [0, 1]")
    return RerankStep(
        name,
        **{
            _FIELDS.get(key, key): int(v) if key in _INTEGER_ARGS else float(v)
            for key, v in args.items()
        },
    )


def parse_steps(specs: Sequence[str]) -> list[RerankStep]:
    """eval.rerank's entries, in order (see parse_step)."""
    if isinstance(specs, str):
        raise ValueError(f"eval.rerank={specs!r}: a list of steps, e.g. ('dba(n=1, alpha=3)',)")
    return [parse_step(spec) for spec in specs]


def weighted_expansion(
    vectors: np.ndarray,
    pool: np.ndarray,
    neighbors: np.ndarray,
    similarities: np.ndarray,
    alpha: float,
) -> np.ndarray:
    """normalise(v + sum_i max(s_i, 0)^alpha pool[j_i]) for every row v.

    Args:
      vectors: [R, D] unit rows to expand.
      pool: [N, D] the vectors their neighbours index.
      neighbors: [R, n] rows of `pool` (-1: none, weight 0).
      similarities: [R, n] each neighbour's cosine with its row.
      alpha: the weights' power.

    Returns:
      [R, D] float32 unit rows.
    """
    out = np.empty((len(vectors), vectors.shape[1]), np.float32)
    for start in range(0, len(vectors), ROWS_PER_CHUNK):
        rows = slice(start, start + ROWS_PER_CHUNK)
        ids = neighbors[rows]
        weights = np.maximum(similarities[rows].astype(np.float64), 0.0) ** alpha
        weights = np.where(ids >= 0, weights, 0.0)
        gathered = pool[np.maximum(ids, 0)].astype(np.float64)  # [r, n, D]
        total = vectors[rows].astype(np.float64) + (weights[:, None, :] @ gathered)[:, 0]
        out[rows] = layers.l2_normalize_rows(total)
    return out


def alpha_query_expansion(
    queries: np.ndarray,
    index: np.ndarray,
    neighbors: np.ndarray,
    distances: np.ndarray,
    step: RerankStep,
) -> np.ndarray:
    """The expanded queries of `step` (alpha_qe) from a search's first neighbours.

    Args:
      queries: [Q, D] unit queries.
      index: [N, D] unit index rows.
      neighbors: [Q, >= n] the queries' nearest index rows, best first.
      distances: their squared L2 distances.
      step: n and alpha.

    Returns:
      [Q, D] unit rows to search the index with again.
    """
    n = min(step.n, neighbors.shape[1])
    similarities = 1.0 - distances[:, :n] / 2.0
    return weighted_expansion(queries, index, neighbors[:, :n], similarities, step.alpha)


def database_augmentation(
    index: np.ndarray,
    step: RerankStep,
    backend: str,
    index_neighbors: IndexNeighbors | None = None,
) -> np.ndarray:
    """The augmented index of `step` (dba): each row with its n nearest other rows.

    Args:
      index: [N, D] unit rows.
      step: n and alpha.
      backend: the kNN backend of the index's self-search (knn.BACKENDS).
      index_neighbors: where the self-search's answer is kept (None: searched).

    Returns:
      [N, D] unit rows.
    """
    k = min(step.n + 1, len(index))
    search = index_neighbors or (lambda k: knn.search(index, index, k, backend=backend))
    distances, neighbors = (a[:, :k] for a in search(k))
    # Each row's own entry leaves its list (it may tie with a duplicate and
    # not come first); the n nearest others remain.
    own = neighbors == np.arange(len(index))[:, None]
    others = np.where(own.any(axis=1, keepdims=True), ~own, np.arange(k) < k - 1)
    order = np.argsort(~others, axis=1, kind="stable")[:, : k - 1]
    neighbors = np.take_along_axis(neighbors, order, axis=1)
    similarities = 1.0 - np.take_along_axis(distances, order, axis=1) / 2.0
    return weighted_expansion(index, index, neighbors, similarities, step.alpha)


@dataclasses.dataclass(frozen=True)
class Ranking:
    """The first search's answer, or the answer after a step of eval.rerank.

    Attributes:
      label: 'first stage', then each step's label joined by ' + '.
      distances: [Q, k] squared L2 between the unit rows (after superglobal:
        2 - 2 x its final score, the same scale).
      neighbors: [Q, k] index rows, best first.
      seconds: this step's own wall time (augmenting, expanding, re-ordering
        and its search).
    """

    label: str
    distances: np.ndarray
    neighbors: np.ndarray
    seconds: float


def rerank_searches(
    queries: np.ndarray,
    index: np.ndarray,
    steps: Sequence[RerankStep],
    k: int,
    backend: str,
    index_neighbors: IndexNeighbors | None = None,
    index_search: knn.IndexSearch | None = None,
) -> list[Ranking]:
    """The first search and the search after each step, in order.

    Rows are L2-normalised first (an ensemble's concatenation has the norm
    of its weights; its ranking is unchanged), so similarities are cosines.

    Args:
      queries: [Q, D] queries.
      index: [N, D] index rows.
      steps: eval.rerank's steps (parse_steps).
      k: neighbours per query.
      backend: knn.search's backend.
      index_neighbors: the index's self-search, kept by the caller (e.g. in
        the workdir); used while the index is the one given (before a dba).
      index_search: a knn.IndexSearch over the unit rows of `index` (its
        ScaNN searcher reused; None: one is made here).

    Returns:
      [Ranking]: 'first stage', then 'dba(...)', 'dba(...) + alpha_qe(...)'
      ... each applied to the one before.
    """
    queries, index = unit_rows(queries), unit_rows(index)
    clock = time.perf_counter()
    # One search object per index: ScaNN builds its searcher once for the
    # first search, the self-search and the later steps' searches.
    searched = index_search or knn.IndexSearch(index, backend)
    if searched.index.shape != index.shape:
        raise ValueError(f"index_search has a {searched.index.shape} index, not {index.shape}")
    distances, neighbors = searched.search(queries, k)
    out = [Ranking("first stage", distances, neighbors, time.perf_counter() - clock)]
    for step in steps:
        clock = time.perf_counter()
        own = index_neighbors or functools.partial(searched.search, searched.index)
        if step.name == "dba":
            index = database_augmentation(index, step, backend, own)
            # The augmented index has neighbours of its own; the given index's
            # searcher is freed before the augmented one is built.
            index_neighbors = own = None
            searched = knn.IndexSearch(index, backend)
            distances, neighbors = searched.search(queries, k)
        elif step.name == "alpha_qe":
            queries = alpha_query_expansion(queries, index, neighbors, distances, step)
            distances, neighbors = searched.search(queries, k)
        elif step.name == "k_reciprocal":
            distances, neighbors = _k_reciprocal(queries, searched, distances, neighbors, step, own)
        else:
            # Its own m candidates (m may exceed k); the scores, as distances
            # 2 - 2 s of unit vectors, feed the steps after it.
            m = min(max(step.m, k), len(index))
            found, candidates = searched.search(queries, m)
            scores, reranked = superglobal_rerank.superglobal_rerank(
                queries, index, candidates, step.m, step.k, step.beta, found
            )
            distances, neighbors = (2.0 - 2.0 * scores[:, :k]).astype(np.float32), reranked[:, :k]
        label = f"{out[-1].label} + {step.label()}" if len(out) > 1 else step.label()
        out.append(Ranking(label, distances, neighbors, time.perf_counter() - clock))
    return out


def _k_reciprocal(queries, searched, distances, neighbors, step, index_neighbors):
    """The k candidates re-ordered by k-reciprocal re-ranking, each with the
    distance it had (the steps after it weigh by true similarities)."""
    index = searched.index
    width = min(max(step.k1 + 1, step.k2), len(index))
    _, reordered = k_reciprocal.k_reciprocal_rerank(
        queries,
        index,
        neighbors,
        step.k1,
        step.k2,
        step.lambda_value,
        searched.backend,
        index_neighbors(width)[1][:, :width],
        index_search=searched,
    )
    # Where each re-ordered candidate stood: a search in each row's sorted
    # candidates, all rows at once (row r's values offset by r (N + 2)).
    rows, offset = len(neighbors), len(index) + 2
    shift = np.arange(rows, dtype=np.int64)[:, None] * offset
    order = np.argsort(neighbors, axis=1, kind="stable")
    ranked = np.take_along_axis(neighbors, order, axis=1) + 1 + shift
    where = np.searchsorted(ranked.ravel(), (reordered + 1 + shift).ravel()).reshape(rows, -1)
    where -= np.arange(rows)[:, None] * neighbors.shape[1]
    sorted_distances = np.take_along_axis(distances, order, axis=1)
    return np.take_along_axis(sorted_distances, where, axis=1), reordered


def unit_rows(x: np.ndarray) -> np.ndarray:
    """x with unit rows (x itself when they are, to float rounding)."""
    x = np.asarray(x, np.float32)
    norms = np.linalg.norm(x, axis=1)
    return x if np.allclose(norms, 1.0, atol=1e-5) else layers.l2_normalize_rows(x)
