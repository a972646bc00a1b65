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
import tracemalloc
from typing import Any

import bench_report
from knn_search import clustered_set

from landmark_jax.retrieval import rerank

# The steps timed, each alone after the first search, at their papers'
# settings: alpha_qe and dba as Radenović et al. 2018 tune them on Revisited,
# SuperGlobal's released defaults, k-reciprocal's person re-id defaults.
STEPS = (
    "dba(n=1, alpha=3)",
    "alpha_qe(n=2, alpha=3)",
    "superglobal(m=400, k=9, beta=0.15)",
    "k_reciprocal(k1=20, k2=6, lambda=0.3)",
)
MODES = {
    # index rows, dim, clusters, queries, backend
    "small": (2_000, 16, 100, 20, "exact"),
    "full": (761_757, 512, 100_000, 1_000, "scann"),
}


def _peak_gib() -> float:
    # ru_maxrss is in KiB on Linux.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1 << 20)


def measure(step: str | None, rows: int, dim: int, clusters: int, queries: int, backend: str):
    """One row, in this process: the data, the first search and `step` after it."""
    index, query_rows, _, _ = clustered_set(rows, queries, dim, clusters)
    before = _peak_gib()
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


def run(
    mode: str,
    output_dir: str | None,
    queries: int | None,
    backend: str | None,
    isolate: bool,
    index_rows: int | None = None,
) -> dict[str, Any]:
    rows, dim, clusters, default_queries, default_backend = MODES[mode]
    if index_rows:  # the same clusters' density (about 7.6 rows each at full size)
        clusters = max(1, round(clusters * index_rows / rows))
        rows = index_rows
    data = (rows, dim, clusters, queries or default_queries, backend or default_backend)
    measured = []
    for step in (None, *STEPS):
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
    return run(args.mode, args.output_dir, args.queries, args.backend, isolate, args.index_rows)


if __name__ == "__main__":
    sys.exit(main() and 0)
