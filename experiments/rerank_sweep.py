"""Re-ranking settings tried on trained runs: each run's figures with and without each setting.

    python experiments/rerank_sweep.py --config=configs/demo.py \
      --workdirs=demo_data/workdir,RUN2,RUN3 \
      --settings='dba(n=1, alpha=3)' --settings='alpha_qe(n=2, alpha=3)' \
      --settings='dba(n=1, alpha=3); alpha_qe(n=2, alpha=3)'

Each --settings is one eval.rerank (steps separated by ';'); every run is
evaluated once per setting (`evaluation.evaluate`: the embeddings are
extracted once and read back from each run's eval/ cache, the index's
self-search kept beside them), so a setting is compared with the first
search on the same descriptors. Prints one markdown row per setting: each
run's mAP@100 (and, with --recognition, GAP with the recognition kNN
re-ranked too), then the mean and the range over the runs, the first search
first. The runs' eval/ files are left as the last setting wrote them.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from landmark_jax import config_files
from landmark_jax.retrieval import evaluation


def sweep(config_path: str, workdirs: list[str], settings: list[str], recognition: bool):
    """{ranking label: {'map@100': [per run], 'gap': [per run]}}, 'first stage' first."""
    table: dict[str, dict[str, list[float]]] = {"first stage": {}}
    for i, setting in enumerate(settings):
        steps = tuple(s.strip() for s in setting.split(";") if s.strip())
        for workdir in workdirs:
            config = config_files.load(config_path)
            config.eval.rerank = steps
            config.eval.rerank_recognition = recognition
            config.eval.baselines = ()
            config.eval.gallery_queries = 0
            tables = evaluation.evaluate(config, workdir)["rerank"]
            for key, name in (("retrieval", "map@100"), ("recognition", "gap")):
                if key not in tables:
                    continue
                (first, *_, (label, last)) = tables[key].items()
                if i == 0:  # the same first search for every setting
                    table["first stage"].setdefault(name, []).append(first[1][name])
                table.setdefault(label, {}).setdefault(name, []).append(last[name])
    return table


def markdown(table: dict[str, dict[str, list[float]]], workdirs: list[str]) -> str:
    names = [name for name in ("map@100", "gap") if name in next(iter(table.values()))]
    header = ["re-ranking"]
    for name in names:
        header += [f"{name} run {i}" for i in range(len(workdirs))] + [f"{name} mean (range)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label, figures in table.items():
        cells = [label]
        for name in names:
            values = figures[name]
            cells += [f"{v:.4f}" for v in values]
            cells.append(f"{np.mean(values):.4f} ({min(values):.4f}-{max(values):.4f})")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="the runs' config file (its eval block)")
    parser.add_argument("--workdirs", required=True, help="comma-separated trained runs")
    parser.add_argument("--settings", action="append", required=True, help="steps, ';'-separated")
    parser.add_argument("--recognition", action="store_true", help="also re-rank recognition")
    args = parser.parse_args(argv)
    workdirs = [w for w in args.workdirs.split(",") if w]
    table = sweep(args.config, workdirs, args.settings, args.recognition)
    text = markdown(table, workdirs)
    print(text)
    return text


if __name__ == "__main__":
    sys.exit(main() and 0)
