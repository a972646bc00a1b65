"""Retrieval scoring pieces shared by the trainer's validation and `evaluate`.

`ranked_ids` searches the query embeddings against the index's and lists each
query's nearest index ids; `retrieval_map` is the mAP@100 `evaluate` reports,
computed on a model's current parameters. The trainer imports this module
(and `extract`), never the evaluation orchestrator with its submissions,
gallery, recognition and Revisited benchmark.
"""

from __future__ import annotations

from typing import Any

import ml_collections
import numpy as np

from landmark_jax.retrieval import extract, knn, solutions, usage_metrics


def ranked_ids(
    ec: ml_collections.ConfigDict,
    index: extract.Embeddings,
    test: extract.Embeddings,
    metrics: dict[str, Any] | None = None,
) -> dict[str, list[str]]:
    """Each test query's nearest index ids, best first.

    Args:
      ec: the search settings: `k`, `knn_backend` and, for ScaNN,
        `recall_queries` (an eval block has them all).
      index: the index embeddings.
      test: the query embeddings.
      metrics: where ScaNN's recall@k against exact search, on a sample of
        `recall_queries` queries, goes; None: not measured.

    Returns:
      {query id: up to min(k, index size) index ids}.
    """
    k = min(ec.k, len(index.ids))
    _, neighbors = knn.search(test.embeddings, index.embeddings, k, backend=ec.knn_backend)
    if metrics is not None:
        record_scann_recall(ec, index, test, neighbors, metrics)
    return {
        qid: [str(index.ids[j]) for j in row if j >= 0]
        for qid, row in zip(test.ids, neighbors, strict=True)
    }


def retrieval_map(
    model: extract.TrainedModel,
    *,
    data_dir: str,
    query_split: str,
    index_split: str,
    solution_path: str,
    mesh=None,
) -> float:
    """mAP@100 of a model's queries against its index, as `evaluate` scores it
    (exact search, one view at the model's image size). The trainer's
    validation calls it on the current parameters.

    Raises:
      FileNotFoundError / SolutionFormatError: a missing or malformed solution.
    """
    index, test = (
        extract.extract(model, split, data_dir=data_dir, mesh=mesh)
        for split in (index_split, query_split)
    )
    search = ml_collections.ConfigDict({"k": 100, "knn_backend": "exact"})
    solution = solutions.read_retrieval_solution(solution_path)
    by_usage = usage_metrics.retrieval_metrics_by_usage(ranked_ids(search, index, test), solution)
    return by_usage[solutions.ALL]["map@100"]


def record_scann_recall(
    ec: ml_collections.ConfigDict,
    index: extract.Embeddings,
    test: extract.Embeddings,
    neighbors: np.ndarray,
    metrics: dict[str, Any],
) -> None:
    """With ec.knn_backend='scann': metrics['scann_recall@k'], the recall of
    `neighbors` (the test queries' k nearest) against exact search on a sample
    of ec.recall_queries queries. Other backends: nothing."""
    if ec.knn_backend != "scann":
        return
    k = neighbors.shape[1]
    sample = np.random.default_rng(0).permutation(len(test.ids))[: ec.recall_queries]
    _, exact = knn.search(test.embeddings[sample], index.embeddings, k, backend="exact")
    metrics[f"scann_recall@{k}"] = knn.recall_at_k(neighbors[sample], exact)
