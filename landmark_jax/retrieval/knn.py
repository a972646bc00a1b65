"""k-nearest-neighbour search by squared L2: ScaNN, and the backend dispatch.

GLDv2 retrieval ranks the index images by Euclidean distance between
L2-normalised embeddings (k=100). Two engines answer the same question:

- `exact_search.exact_search` (its own module): matmul + `jax.lax.top_k` on
  the local devices, streamed over index chunks with a running top-k. It is the oracle
  for ScaNN's recall and the fallback when ScaNN cannot be imported. Backend
  'approx_max_k' runs it with `jax.lax.approx_max_k` per chunk: on a TPU the
  fast path (its recall is reported by experiments/benchmarks/knn_search.py).
- `ScannSearcher`: ScaNN's tree + asymmetric hashing + exact reordering,
  parameters scaled to the index size, serialisable to a directory.
- `IndexSearch`: one index searched several times (re-ranking), ScaNN's
  searcher built once.

`search` picks one by name; `recall_at_k` scores an approximate result
against the exact one. Both engines return `(distances, indices)`: float32
squared L2 distances, ascending, and int64 row numbers of the index, each
[Q, k].
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Mapping
from types import ModuleType
from typing import Any

import numpy as np

from landmark_jax.retrieval import exact_search
from landmark_jax.runtime import file_io

__all__ = [
    "BACKENDS",
    "IndexSearch",
    "ScannSearcher",
    "recall_at_k",
    "scann_available",
    "search",
]

logger = logging.getLogger(__name__)

BACKENDS = ("scann", "exact", "approx_max_k")
# approx_max_k: the expected recall of each index chunk's candidates.
APPROX_RECALL_TARGET = 0.95
_SCANN_PIN = "tensorflow-cpu~=2.20.0 and scann==1.4.2"
# Below this many points brute force is exact and still fast, and a tree
# loses more than it saves: on the demo's 1,098 index embeddings the default
# tree (33 leaves, 8 searched) returned 73% of the exact 100 nearest and
# cost 7% of the demo's mAP@100 (0.0888 against 0.0955).
MIN_TREE_POINTS = 10_000
_METADATA_FILE = "landmark_jax_knn.json"
# Queries per `search_batched_parallel` call (bounds memory).
_QUERY_BATCH = 8192


# ---------------------------------------------------------------------- ScaNN


@functools.cache
def _scann_module() -> ModuleType | Exception:
    try:
        from scann.scann_ops.py import scann_ops_pybind
    except Exception as e:  # noqa: BLE001 - a TF ABI mismatch is not an ImportError
        return e
    # `import scann` imports TensorFlow: the entry point has already hidden
    # the accelerators from it (tensorflow_setup).
    return scann_ops_pybind


def scann_available() -> bool:
    """Whether ScaNN can be imported (the result is cached)."""
    return isinstance(_scann_module(), ModuleType)


def _import_error_message(error: Exception) -> str:
    return (
        f"ScaNN could not be imported ({type(error).__name__}: {error}). Install the "
        f"pinned pair {_SCANN_PIN} (scann 1.4.2 loads a TensorFlow op library built for "
        "TF 2.20 and fails with other versions), or use backend='exact'."
    )


def _scann() -> ModuleType:
    module = _scann_module()
    if isinstance(module, Exception):
        raise ImportError(_import_error_message(module)) from module
    return module


class ScannSearcher:
    """A ScaNN index over one [N, D] array, searched by squared L2.

    Build with `ScannSearcher.build`, or restore one with `ScannSearcher.load`.
    Attributes describe the built configuration: `num_points`, `dim`,
    `num_neighbors` (default k), `brute_force`, and for trees `num_leaves`,
    `num_leaves_to_search`, `reorder_k` (None when brute force).
    """

    def __init__(self, searcher: Any, config: Mapping[str, Any]):
        self._searcher = searcher
        self.config = dict(config)
        self.num_points: int = self.config["num_points"]
        self.dim: int = self.config["dim"]
        self.num_neighbors: int = self.config["num_neighbors"]
        self.brute_force: bool = self.config["brute_force"]
        self.num_leaves: int | None = self.config.get("num_leaves")
        self.num_leaves_to_search: int | None = self.config.get("num_leaves_to_search")
        self.reorder_k: int | None = self.config.get("reorder_k")

    @classmethod
    def build(
        cls,
        index: np.ndarray,
        *,
        num_neighbors: int = 100,
        num_leaves: int | None = None,
        num_leaves_to_search: int | None = None,
        training_sample_size: int | None = None,
        dimensions_per_block: int = 2,
        reorder_k: int | None = None,
    ) -> ScannSearcher:
        """Builds a tree + asymmetric-hashing + reordering searcher.

        Indexes of fewer than 10,000 points (unless num_leaves is given), or
        of fewer than 2 * num_leaves, get an exact float32 brute-force
        searcher instead: there a tree saves little time and loses recall.

        Args:
          index: [N, D] database embeddings.
          num_neighbors: default k of `search`.
          num_leaves: partitions of the k-means tree; default round(sqrt(N)).
          num_leaves_to_search: partitions scored per query; default 10% of the
            leaves, at least 8 (capped at num_leaves). Data without cluster
            structure (random vectors) needs far more.
          training_sample_size: points sampled to train the tree and the AH
            codebooks; default min(N, 100000).
          dimensions_per_block: dimensions per AH sub-space (16 centres each).
          reorder_k: AH candidates rescored exactly; default
            max(500, 5 * num_neighbors), capped at N.

        Returns:
          The searcher.

        Raises:
          ImportError: ScaNN cannot be imported (message names the pinned pair).
          ValueError: invalid index or parameters.
        """
        index = exact_search.check_matrix("index", index)
        num_points, dim = index.shape
        exact_search.check_k(num_neighbors, num_points)
        for name, value in [
            ("num_leaves", num_leaves),
            ("num_leaves_to_search", num_leaves_to_search),
            ("training_sample_size", training_sample_size),
            ("dimensions_per_block", dimensions_per_block),
            ("reorder_k", reorder_k),
        ]:
            if value is not None and value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        scann = _scann()
        leaves = min(num_leaves or max(1, round(math.sqrt(num_points))), num_points)
        config: dict[str, Any] = dict(
            num_points=num_points, dim=dim, num_neighbors=num_neighbors, brute_force=True
        )
        builder = scann.builder(index, num_neighbors, "squared_l2")
        too_few = num_leaves is None and num_points < MIN_TREE_POINTS
        if too_few or num_points < 2 * leaves:
            logger.info("ScaNN: brute force over %d points (too few for a tree)", num_points)
            searcher = builder.score_brute_force().build()
            return cls(searcher, config)

        to_search = num_leaves_to_search or max(8, math.ceil(leaves / 10))
        to_search = min(to_search, leaves)
        sample = min(training_sample_size or 100_000, num_points)
        reorder = min(reorder_k or max(500, math.ceil(5 * num_neighbors)), num_points)
        reorder = max(reorder, num_neighbors)
        config.update(
            brute_force=False,
            num_leaves=leaves,
            num_leaves_to_search=to_search,
            training_sample_size=sample,
            dimensions_per_block=dimensions_per_block,
            reorder_k=reorder,
        )
        logger.info("ScaNN: building %s", config)
        searcher = (
            builder.tree(
                num_leaves=leaves, num_leaves_to_search=to_search, training_sample_size=sample
            )
            .score_ah(dimensions_per_block, training_sample_size=sample)
            .reorder(reorder)
            .build()
        )
        return cls(searcher, config)

    def search(
        self,
        queries: np.ndarray,
        k: int | None = None,
        *,
        leaves_to_search: int | None = None,
        reorder_k: int | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Approximate k nearest neighbours of each query.

        When the searched leaves hold fewer than k points for a query, its
        missing slots are index -1 at distance +inf (a warning is logged).

        Args:
          queries: [Q, D] query embeddings.
          k: neighbours per query; default the build's num_neighbors.
          leaves_to_search: override of the build's num_leaves_to_search.
          reorder_k: override of the build's reorder_k (at least k is used).

        Returns:
          (distances [Q, k] float32 ascending, indices [Q, k] int64).

        Raises:
          ValueError: invalid queries, dimension mismatch, k < 1 or k > N.
        """
        queries = exact_search.check_matrix("queries", queries)
        if queries.shape[1] != self.dim:
            raise ValueError(
                f"dimension mismatch: queries have {queries.shape[1]} dims, "
                f"the index has {self.dim}"
            )
        k = self.num_neighbors if k is None else k
        exact_search.check_k(k, self.num_points)
        leaves = pre_reorder = None
        if not self.brute_force:
            leaves = min(leaves_to_search or self.num_leaves_to_search, self.num_leaves)
            pre_reorder = min(max(reorder_k or self.reorder_k, k), self.num_points)
        distances = np.full((queries.shape[0], k), np.inf, np.float32)
        indices = np.full((queries.shape[0], k), -1, np.int64)
        for start in range(0, queries.shape[0], _QUERY_BATCH):
            # ScaNN's threads split the batch (each query's answer is its own).
            ids, dist = self._searcher.search_batched_parallel(
                queries[start : start + _QUERY_BATCH], k, pre_reorder, leaves
            )
            # ScaNN trims columns to the longest result in the batch and pads
            # shorter rows with index 0 at distance NaN.
            found = ~np.isnan(dist)
            rows = slice(start, start + ids.shape[0])
            indices[rows, : ids.shape[1]] = np.where(found, ids.astype(np.int64), -1)
            distances[rows, : ids.shape[1]] = np.where(found, dist, np.inf)
        short = int(np.sum(indices[:, -1] < 0))
        if short:
            logger.warning(
                "ScaNN found fewer than k=%d neighbours for %d of %d queries; search more leaves",
                k,
                short,
                queries.shape[0],
            )
        return distances, indices

    def save(self, directory: str) -> None:
        """Writes the ScaNN assets and this wrapper's config to `directory`.

        Raises:
          ValueError: `directory` is a URL: ScaNN writes its assets with
            plain local file I/O, so a gs:// folder would become a local one.
        """
        _check_local(directory)
        file_io.makedirs(directory)
        self._searcher.serialize(directory)
        file_io.write_json(file_io.join(directory, _METADATA_FILE), self.config)

    @classmethod
    def load(cls, directory: str) -> ScannSearcher:
        """Restores a searcher written by `save`.

        Raises:
          FileNotFoundError: `directory` lacks the config written by `save`.
          ImportError: ScaNN cannot be imported.
        """
        _check_local(directory)
        path = file_io.join(directory, _METADATA_FILE)
        if not file_io.isfile(path):
            raise FileNotFoundError(
                f"{path} not found: {directory!r} was not written by ScannSearcher.save"
            )
        config = file_io.read_json(path)
        return cls(_scann().load_searcher(directory), config)


def _check_local(directory: str) -> None:
    if file_io.is_url(directory):
        raise ValueError(
            f"{directory}: ScaNN reads and writes its assets on a local disk only; "
            "copy them to or from the bucket yourself"
        )


# ------------------------------------------------------------------- dispatch


class IndexSearch:
    """One index searched several times with one backend.

    ScaNN's searcher is built on the first search and reused by the later
    ones (re-ranking searches the same index three or four times: the first
    stage, DBA's self-search, a query expansion, k-reciprocal's node lists),
    each with the reordering depth a searcher built for its own k would use,
    so the answers are those of a fresh `search` per call.

    Attributes:
      index: [N, D] float32 database embeddings.
      backend: the backend used ('scann' falls back to 'exact', with a
        warning, when ScaNN cannot be imported).
    """

    def __init__(self, index: np.ndarray, backend: str = "scann"):
        """Checks `index` and `backend`; builds nothing yet.

        Raises:
          ValueError: unknown backend, or an invalid index.
        """
        if backend not in BACKENDS:
            raise ValueError(f"unknown kNN backend {backend!r}; valid backends: {BACKENDS}")
        if backend == "scann" and not scann_available():
            error = _scann_module()
            logger.warning("%s Falling back to exact search.", _import_error_message(error))
            backend = "exact"
        self.index = exact_search.check_matrix("index", index)
        self.backend = backend
        self._scann: ScannSearcher | None = None

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The k nearest index rows of each query (see `search`).

        Raises:
          ValueError: invalid queries, dimension mismatch, k < 1 or k > N.
        """
        if self.backend == "exact":
            return exact_search.exact_search(queries, self.index, k)
        if self.backend == "approx_max_k":
            return exact_search.exact_search(
                queries, self.index, k, recall_target=APPROX_RECALL_TARGET
            )
        if self._scann is None:
            # Bad queries fail before the build, not after it.
            queries, _ = exact_search.check_pair(queries, self.index, k)
            self._scann = ScannSearcher.build(self.index, num_neighbors=k)
        # A build for k would rescore max(500, 5k) candidates (ScannSearcher.build).
        return self._scann.search(queries, k, reorder_k=max(500, math.ceil(5 * k)))


def search(
    queries: np.ndarray,
    index: np.ndarray,
    k: int,
    backend: str = "scann",
) -> tuple[np.ndarray, np.ndarray]:
    """k nearest neighbours of each query in `index`, by squared L2.

    backend='scann' falls back to exact search, with a warning, when ScaNN
    cannot be imported: slower, but the answer is only better. To search
    one index several times, build an `IndexSearch` once.

    Args:
      queries: [Q, D] query embeddings.
      index: [N, D] database embeddings.
      k: neighbours per query.
      backend: 'scann' (approximate, on the host), 'exact' (matmul + top_k on
        the devices) or 'approx_max_k' (the same with TPU's approximate top-k,
        expected recall APPROX_RECALL_TARGET per index chunk).

    Returns:
      (distances [Q, k] float32 ascending, indices [Q, k] int64).

    Raises:
      ValueError: unknown backend, or invalid inputs.
    """
    return IndexSearch(index, backend).search(queries, k)


def recall_at_k(
    approx_indices: np.ndarray, exact_indices: np.ndarray, k: int | None = None
) -> float:
    """Mean over queries of |approx top-k ∩ exact top-k| / k.

    Args:
      approx_indices: [Q, >=k] neighbours from an approximate search.
      exact_indices: [Q, >=k] true neighbours, distinct within a row.
      k: cut-off; default the width of exact_indices.

    Returns:
      Recall@k in [0, 1].

    Raises:
      ValueError: shapes differ in Q, or either has fewer than k columns.
    """
    approx, exact = np.asarray(approx_indices), np.asarray(exact_indices)
    if approx.ndim != 2 or exact.ndim != 2 or approx.shape[0] != exact.shape[0]:
        raise ValueError(
            f"need [Q, k] arrays with the same Q, got {approx.shape} and {exact.shape}"
        )
    k = exact.shape[1] if k is None else k
    if k < 1 or approx.shape[1] < k or exact.shape[1] < k:
        raise ValueError(f"k={k} needs >= k columns, got {approx.shape} and {exact.shape}")
    if exact.shape[0] == 0:
        raise ValueError("no queries: recall is undefined")
    approx, exact = approx[:, :k], exact[:, :k]
    hits = 0
    # Row blocks keep the [rows, k, k] comparison small (GLDv2 has 117k queries).
    for start in range(0, exact.shape[0], 1024):
        a, e = approx[start : start + 1024], exact[start : start + 1024]
        hits += int(np.sum((e[:, :, None] == a[:, None, :]).any(axis=2)))
    return hits / (exact.shape[0] * k)
