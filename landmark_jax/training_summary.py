r"""Prints how a training run went, from its workdir's metrics.jsonl.

python -m landmark_jax.training_summary --workdir=DIR
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from absl import app, flags

from landmark_jax import checkpointing, entry_point_errors, file_io
from landmark_jax.metric_writer import METRICS_FILE


def summarize(workdir: str) -> str:
    """First and last logged loss, the eval metrics, and the checkpoints.

    Raises:
      FileNotFoundError: the workdir has no metrics.jsonl.
    """
    path = file_io.join(workdir, METRICS_FILE)
    if not file_io.exists(path):
        raise FileNotFoundError(f"{path} not found: has a run been started in {workdir}?")
    rows = [json.loads(line) for line in file_io.read_text(path).splitlines() if line.strip()]
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
    steps = checkpointing.saved_steps(workdir)
    if steps:
        lines.append(f"  checkpoints at steps {steps}")
    return "\n".join(lines)


FLAGS = flags.FLAGS


def define_flags() -> None:
    """Defines the command-line flags (only when run as a program: absl flags are
    global, and importing two tools into one process must not collide)."""
    flags.DEFINE_string("workdir", None, "The training run's workdir.")
    flags.mark_flags_as_required(["workdir"])


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    print(summarize(FLAGS.workdir))


if __name__ == "__main__":
    define_flags()
    entry_point_errors.run(main)
