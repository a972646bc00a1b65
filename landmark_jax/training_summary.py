r"""Prints how a training run went, from its workdir's metrics.jsonl.

python -m landmark_jax.training_summary --workdir=DIR
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence

from landmark_jax import checkpointing
from landmark_jax.metric_writer import METRICS_FILE


def summarize(workdir: str) -> str:
    """First and last logged loss, the eval metrics, and the checkpoints.

    Raises:
      FileNotFoundError: the workdir has no metrics.jsonl.
    """
    path = os.path.join(workdir, METRICS_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: has a run been started in {workdir}?")
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    if not rows:
        raise ValueError(f"{path} is empty")
    first, last = rows[0], rows[-1]
    lines = [
        f"{workdir}: {len(rows)} log steps up to step {last['step']}",
        f"  train loss {first['loss']:.3f} (step {first['step']}) -> {last['loss']:.3f} "
        f"(step {last['step']})",
    ]
    for row in rows:
        evals = {k: v for k, v in row.items() if k.startswith(("val_", "train_", "eval_"))}
        if evals:
            lines.append(
                f"  step {row['step']}: " + ", ".join(f"{k} {v:.4f}" for k, v in evals.items())
            )
    checkpoints = os.path.join(workdir, checkpointing.CHECKPOINT_DIR)
    if os.path.isdir(checkpoints):
        steps = sorted(int(d) for d in os.listdir(checkpoints) if d.isdigit())
        lines.append(f"  checkpoints at steps {steps}")
    return "\n".join(lines)


def main(argv: Sequence[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m landmark_jax.training_summary")
    parser.add_argument("--workdir", required=True)
    print(summarize(parser.parse_args(argv).workdir))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
