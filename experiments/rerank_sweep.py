"""Re-ranking settings tried on trained runs: each run's figures with and without each setting.

    python experiments/rerank_sweep.py --config=configs/demo.py \
      --workdirs=demo_data/workdir,RUN2,RUN3 \
      --settings='dba(n=1, alpha=3)' --settings='alpha_qe(n=2, alpha=3)' \
      --settings='dba(n=1, alpha=3); alpha_qe(n=2, alpha=3)'

Each --settings is one eval.rerank (steps separated by ';'), and may set
eval keys too, e.g. SuperGlobal's pooling: --settings='eval.gem_plus=True;
superglobal(m=100, k=3, beta=0.15)' (values as Python literals). Every run is
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
import ast
import re
import sys

import numpy as np

from landmark_jax import config_files
from landmark_jax.retrieval import evaluation

# A setting's part that sets a config key ('eval.gem_plus=True'), not a step.
_KEY = re.compile(r"^[A-Za-z_][\w.]*=")


def sweep(config_path: str, workdirs: list[str], settings: list[str], recognition: bool):
    """{row label: {'map@100': [per run], 'gap': [per run]}}, 'first stage' first."""
    table: dict[str, dict[str, list[float]]] = {"first stage": {}}
    recorded: set[tuple[str, str]] = set()

    def add(label: str, name: str, value: float) -> None:
        table.setdefault(label, {}).setdefault(name, []).append(value)

    for setting in settings:
        parts = [p.strip() for p in setting.split(";") if p.strip()]
        keys = dict(p.split("=", 1) for p in parts if _KEY.match(p))
        steps = tuple(p for p in parts if not _KEY.match(p))
        prefix = ", ".join(f"{k}={v}" for k, v in keys.items())
        for workdir in workdirs:
            config = config_files.load(config_path)
            config_files.override(config, {k: ast.literal_eval(v) for k, v in keys.items()})
            config.eval.rerank = steps
            config.eval.rerank_recognition = recognition and bool(steps)
            config.eval.baselines = ()
            config.eval.gallery_queries = 0
            metrics = evaluation.evaluate(config, workdir)
            for key, name in (("retrieval", "map@100"), ("recognition", "gap")):
                if steps and key in metrics["rerank"]:
                    (_, first), *_, (label, last) = metrics["rerank"][key].items()
                elif not steps and name in metrics:
                    label, first = "first stage", {name: metrics[name]}
                    last = first
                else:
                    continue
                # The first search of the same descriptors, once per run.
                if not keys and (name, workdir) not in recorded:
                    recorded.add((name, workdir))
                    add("first stage", name, first[name])
                elif keys:
                    add(f"{prefix}: first stage", name, first[name])
                if steps:
                    add(f"{prefix}: {label}" if keys else label, name, last[name])
        # Each setting's rows as they are done (a long sweep loses nothing).
        done = {label: figures for label, figures in table.items() if figures}
        print(markdown(done, workdirs), flush=True)
    return {label: figures for label, figures in table.items() if figures}


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
