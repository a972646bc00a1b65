"""eval.rerank in the evaluation: every benchmark scored after each step, with its time.

`evaluate` re-ranks each search it scores when eval.rerank lists steps
(retrieval/rerank.py): GLDv2 retrieval (test against index), the Revisited
benchmark (queries against the whole database) and, with
eval.rerank_recognition, the recognition kNN (test against train). Each
benchmark's headline figures (map@100, the Revisited table, gap) are those of
the last ranking, the one submitted; `metrics['rerank']` holds every ranking's
figures side by side, the first search's included, and each step's seconds:

    {'retrieval':   {label: {'map@100': x, 'seconds': s}},
     'revisited':   {label: {'easy': {'map': x, 'mp@10': x}, 'medium': ..., 'hard': ...,
                             'seconds': s}},
     'recognition': {label: {'gap': x, 'seconds': s}}}

DBA (and any step that needs the index's nearest neighbours among itself)
searches the index against itself once; the answer is kept in
<workdir>/eval/neighbours-<split>.npz, keyed by the digest of the (unit)
index descriptors and the kNN backend, as the embedding caches are keyed by
what made them, so a re-run with other steps or parameters reuses it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import zipfile
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from landmark_jax.retrieval import knn, rerank
from landmark_jax.runtime import file_io

# Where an index's self-search is kept, in <workdir>/eval/.
NEIGHBOURS_FILE = "neighbours-{split}.npz"


def kept_index_neighbors(
    index: np.ndarray,
    backend: str,
    path: str | None,
    writes: bool,
    index_search: knn.IndexSearch | None = None,
) -> rerank.IndexNeighbors:
    """The self-search of `index`, read from `path` when it holds this index's.

    Args:
      index: [N, D] the index rows (normalised here, as rerank_searches does).
      backend: knn.search's backend.
      path: the file that keeps the answer (None: searched every time).
      writes: whether this process writes the file (process 0).
      index_search: the knn.IndexSearch that searches the unit rows when the
        file does not answer (its ScaNN searcher shared with the caller's
        other searches; None: one is made for the search).

    Returns:
      A function of k giving (distances [N, >= k], neighbors [N, >= k]),
      each row's own entry among them; searched at most once per call.
    """
    unit = rerank.unit_rows(index)

    def neighbors(k: int) -> tuple[np.ndarray, np.ndarray]:
        settings = {
            "index_sha256": hashlib.sha256(np.ascontiguousarray(unit).data).hexdigest(),
            "rows": int(unit.shape[0]),
            "dim": int(unit.shape[1]),
            "backend": backend,
        }
        kept = _read(path, settings) if path and file_io.exists(path) else None
        if kept is not None and kept[1].shape[1] >= k:
            logging.info("Re-ranking: the index's %d nearest neighbours from %s", k, path)
            return kept
        search = index_search or knn.IndexSearch(unit, backend)
        distances, found = search.search(unit, k)
        if path and writes:
            file_io.save_npz(
                path, distances=distances, neighbors=found, settings=json.dumps(settings)
            )
        return distances, found

    return neighbors


def _read(path: str, settings: dict[str, Any]) -> tuple[np.ndarray, np.ndarray] | None:
    """The kept (distances, neighbors) at `path` if made for `settings`, else None.

    The file is the program's own, made again at will: an unreadable one is
    logged and searched again (then overwritten).
    """
    try:
        f = file_io.load_npz(path)
        saved = json.loads(str(f["settings"]))
        distances, neighbors = f["distances"], f["neighbors"]
    except (zipfile.BadZipFile, ValueError, KeyError, EOFError) as e:
        logging.warning("unreadable neighbour file %s (%s); searching again", path, e)
        return None
    shape = (settings["rows"],)
    if saved != settings or distances.shape[:1] != shape or neighbors.shape != distances.shape:
        return None
    return distances, neighbors


def searches(
    queries: np.ndarray,
    index: np.ndarray,
    steps: Sequence[rerank.RerankStep],
    k: int,
    backend: str,
    neighbours_path: str | None,
    writes: bool,
) -> list[rerank.Ranking]:
    """rerank.rerank_searches with the index's self-search kept at `neighbours_path`
    (one ScaNN searcher over the index serves both)."""
    searched = knn.IndexSearch(rerank.unit_rows(index), backend)
    kept = kept_index_neighbors(index, backend, neighbours_path, writes, searched)
    return rerank.rerank_searches(queries, index, steps, k, backend, kept, searched)


def ranked_ids(
    ranking: rerank.Ranking, query_ids: Sequence[Any], index_ids: Sequence[Any]
) -> dict[str, list[str]]:
    """{query id: index ids, best first} of a ranking (no -1 padding)."""
    return {
        str(qid): [str(index_ids[j]) for j in row if j >= 0]
        for qid, row in zip(query_ids, ranking.neighbors, strict=True)
    }


def revisited_figures(scored: Mapping[str, Mapping[str, float]]) -> dict[str, dict[str, float]]:
    """mAP and mP@10 of each protocol of metrics.revisited_map's result."""
    return {p: {key: float(v[key]) for key in ("map", "mp@10")} for p, v in scored.items()}


def format_rerank(rerank_metrics: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> str:
    """The side-by-side table `evaluate` prints: one row per ranking, x100 for
    the Revisited columns (as papers print them), each step's seconds."""
    labels = list(next(iter(rerank_metrics.values())))
    columns = []  # (name, figure of a label, its format)
    if "retrieval" in rerank_metrics:
        table = rerank_metrics["retrieval"]
        columns.append(("mAP@100", lambda label, t=table: t[label]["map@100"], "8.4f"))
    if "recognition" in rerank_metrics:
        table = rerank_metrics["recognition"]
        columns.append(("GAP", lambda label, t=table: t[label]["gap"], "8.4f"))
    if "revisited" in rerank_metrics:
        table = rerank_metrics["revisited"]
        for protocol in ("easy", "medium", "hard"):
            for key, name in (("map", "mAP"), ("mp@10", "mP@10")):
                columns.append(
                    (
                        f"{protocol[0].upper()} {name}",
                        lambda label, t=table, p=protocol, k=key: _percent(t[label][p][k]),
                        "8.2f",
                    )
                )
    width = max(len(label) for label in labels)
    header = f"{'re-ranking':{width}s}  " + "  ".join(f"{name:>8s}" for name, _, _ in columns)
    lines = [header + "  seconds"]
    for label in labels:
        seconds = sum(table[label]["seconds"] for table in rerank_metrics.values())
        cells = "  ".join(
            f"{'-':>8s}" if (x := get(label)) is None else format(x, spec)
            for _, get, spec in columns
        )
        lines.append(f"{label:{width}s}  {cells}  {seconds:7.2f}")
    return "\n".join(lines)


def _percent(x: float | None) -> float | None:
    return None if x is None or np.isnan(x) else 100.0 * x
