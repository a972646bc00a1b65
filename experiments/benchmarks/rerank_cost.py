"""Re-ranking's cost beside the first-stage kNN: seconds and peak host memory per step.

On landmark-like unit vectors (knn_search.clustered_set: GLDv2's index
size, 761,757 x 512, in full mode). `seconds` is the step's own wall time as
evaluate reports it (rerank.Ranking.seconds: for dba the index's self-search
and the weighted sums, for alpha_qe the expansion and the second search, for
superglobal the search of its m candidates and their re-ordering),
`first_stage_seconds` the first search's in the same run. `numpy_peak_gib`
is the peak of the memory numpy and Python allocate during the first search
and the step (tracemalloc), and in full mode each row runs in a process of
its own, so `rss_extra_gib`, its peak resident memory minus the resident
memory once the data is made, counts everything (ScaNN's searchers, XLA).

    python experiments/benchmarks/rerank_cost.py --mode=full --output_dir=OUT
    python experiments/benchmarks/rerank_cost.py --mode=small   # CPU, seconds
    python experiments/benchmarks/rerank_cost.py --mode=full \
        --step='alpha_qe(n=2, alpha=3)' --self_search_sample=20000   # some rows

Full mode searches with ScaNN on the host (the evaluation's default backend)
and 1,000 queries unless --queries says otherwise (GLDv2's test split has
117,577: the first stage and alpha_qe scale with it, dba does not).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
import tracemalloc
from typing import Any

import bench_report
import numpy as np
from knn_search import clustered_set

from landmark_jax.retrieval import knn, rerank

# The steps timed, each alone after the first search, at their papers'
# settings: alpha_qe and dba as Radenović et al. 2018 tune them on Revisited,
# SuperGlobal's released defaults, k-reciprocal's person re-id defaults.
STEPS = (
    "dba(n=1, alpha=3)",
    "alpha_qe(n=2, alpha=3)",
    "superglobal(m=400, k=9, beta=0.15)",
    "k_reciprocal(k1=20, k2=6, lambda=0.3)",
)
# The self-search row's step name (followed by its sample size) and its k:
# k_reciprocal's widest self-search at its defaults (k1 + 1).
SELF_SEARCH_ROW = "self-search:"
SELF_SEARCH_K = 21
MODES = {
    # index rows, dim, clusters, queries, backend
    "small": (2_000, 16, 100, 20, "exact"),
    "full": (761_757, 512, 100_000, 1_000, "scann"),
}


def _peak_gib() -> float:
    # ru_maxrss is in KiB on Linux.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1 << 20)


def measure(step: str | None, rows: int, dim: int, clusters: int, queries: int, backend: str):
    """One row, in this process: the data, the first search and `step` after it.

    step SELF_SEARCH_ROW (`self-search:S`) instead times the index's
    self-search on S of its rows (k = SELF_SEARCH_K) with the first search's
    searcher, for its rate: dba and k_reciprocal search every index row.
    """
    index, query_rows, _, _ = clustered_set(rows, queries, dim, clusters)
    before = _peak_gib()
    if step and step.startswith(SELF_SEARCH_ROW):
        return _self_search_row(int(step[len(SELF_SEARCH_ROW) :]), index, query_rows, backend)
    steps = rerank.parse_steps([step] if step else [])
    tracemalloc.start()
    try:
        rankings = rerank.rerank_searches(query_rows, index, steps, min(100, rows), backend)
        numpy_peak = tracemalloc.get_traced_memory()[1] / (1 << 30)
    finally:
        tracemalloc.stop()
    return {
        "step": step or "first stage kNN",
        "index_rows": rows,
        "dim": dim,
        "queries": queries,
        "backend": backend,
        "seconds": rankings[-1].seconds,
        "first_stage_seconds": rankings[0].seconds,
        "numpy_peak_gib": numpy_peak,
        "data_gib": before,
        "rss_extra_gib": _peak_gib() - before,
    }


def _self_search_row(sample: int, index, query_rows, backend: str) -> dict[str, Any]:
    searched = knn.IndexSearch(index, backend)
    clock = time.perf_counter()
    searched.search(query_rows, min(100, len(index)))  # the first stage: builds ScaNN's searcher
    first = time.perf_counter() - clock
    rows = index[np.random.default_rng(1).choice(len(index), min(sample, len(index)), False)]
    clock = time.perf_counter()
    searched.search(rows, min(SELF_SEARCH_K, len(index)))
    seconds = time.perf_counter() - clock
    return {
        "step": f"index self-search, {len(rows):,} of {len(index):,} rows (k={SELF_SEARCH_K})",
        "index_rows": len(index),
        "dim": index.shape[1],
        "queries": len(rows),
        "backend": searched.backend,
        "seconds": seconds,
        "first_stage_seconds": first,
        "self_search_all_rows_seconds": seconds * len(index) / len(rows),
    }


def run(
    mode: str,
    output_dir: str | None,
    queries: int | None,
    backend: str | None,
    isolate: bool,
    index_rows: int | None = None,
    steps: tuple[str, ...] = STEPS,
    self_search_sample: int = 0,
) -> dict[str, Any]:
    rows, dim, clusters, default_queries, default_backend = MODES[mode]
    if index_rows:  # the same clusters' density (about 7.6 rows each at full size)
        clusters = max(1, round(clusters * index_rows / rows))
        rows = index_rows
    data = (rows, dim, clusters, queries or default_queries, backend or default_backend)
    measured = []
    extra = (f"{SELF_SEARCH_ROW}{self_search_sample}",) if self_search_sample else ()
    for step in (None, *steps, *extra):
        if not isolate:
            row = measure(step, *data)
            row["data_gib"] = row["rss_extra_gib"] = None  # not this row's alone
            measured.append(row)
            continue
        child = subprocess.run(
            [sys.executable, __file__, "--row", step or "", *map(str, data)],
            capture_output=True,
            text=True,
            check=False,
        )
        if child.returncode != 0:
            raise RuntimeError(f"row {step or 'first stage kNN'} failed:\n{child.stderr[-3000:]}")
        measured.append(json.loads(child.stdout.strip().splitlines()[-1]))
        print(json.dumps(measured[-1]), flush=True)  # a long run keeps its finished rows
    columns = ["step", "index_rows", "dim", "queries", "backend", "seconds"]
    columns += ["first_stage_seconds", "numpy_peak_gib", "data_gib", "rss_extra_gib"]
    columns += ["self_search_all_rows_seconds"] if self_search_sample else []
    return bench_report.report("rerank_cost", measured, columns, output_dir)


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=tuple(MODES), default="small")
    parser.add_argument("--queries", type=int, default=None)
    parser.add_argument("--backend", default=None, help="knn.search's backend (default per mode)")
    parser.add_argument(
        "--index_rows", type=int, default=None, help="another index size than the mode's"
    )
    parser.add_argument(
        "--step",
        action="append",
        default=None,
        help="a step to time (repeatable; default: every step of STEPS)",
    )
    parser.add_argument(
        "--self_search_sample",
        type=int,
        default=0,
        help="add a row timing the index's self-search on this many of its rows "
        "(its rate; dba and k_reciprocal search all of them)",
    )
    parser.add_argument(
        "--isolate",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="each row in a process of its own, for its resident memory (default: full mode)",
    )
    parser.add_argument("--output_dir", default=os.environ.get("OUT"))
    parser.add_argument("--row", nargs=6, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.row:  # a child: one row, printed as JSON
        step, rows, dim, clusters, queries, backend = args.row
        row = measure(step or None, int(rows), int(dim), int(clusters), int(queries), backend)
        print(json.dumps(row))
        return None
    isolate = args.mode == "full" if args.isolate is None else args.isolate
    steps = tuple(args.step) if args.step else STEPS
    rerank.parse_steps(steps)  # a bad step is named before any row runs
    return run(
        args.mode,
        args.output_dir,
        args.queries,
        args.backend,
        isolate,
        args.index_rows,
        steps,
        args.self_search_sample,
    )


if __name__ == "__main__":
    sys.exit(main() and 0)
