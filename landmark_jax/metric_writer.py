"""Training metrics to `metrics.jsonl` and TensorBoard, from process 0 only."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping

import jax
import numpy as np

METRICS_FILE = "metrics.jsonl"


class MetricWriter:
    """Appends one JSON object per log step and mirrors scalars to TensorBoard.

    On processes other than 0 every method does nothing, so the train loop
    calls it unconditionally.
    """

    def __init__(self, workdir: str, tensorboard: bool = True):
        self._active = jax.process_index() == 0
        self._path = os.path.join(workdir, METRICS_FILE)
        self._tb = None
        if self._active:
            os.makedirs(workdir, exist_ok=True)
            if tensorboard:
                import tensorflow as tf

                self._tb = tf.summary.create_file_writer(os.path.join(workdir, "tensorboard"))

    def write(self, step: int, metrics: Mapping[str, float]) -> None:
        """Records `metrics` (python or numpy scalars) at `step`."""
        if not self._active:
            return
        row = {"step": int(step), **{k: _scalar(v) for k, v in metrics.items()}}
        with open(self._path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self._tb is not None:
            import tensorflow as tf

            with self._tb.as_default(step=int(step)):
                for key, value in row.items():
                    if key != "step" and isinstance(value, float | int):
                        tf.summary.scalar(key, value)
            self._tb.flush()

    def truncate_after(self, step: int) -> None:
        """Drops rows past `step`: a resumed run rewrites what its crash lost."""
        if not self._active or not os.path.exists(self._path):
            return
        with open(self._path) as f:
            rows = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
        with open(self._path, "w") as f:
            f.writelines(rows)


def _scalar(value):
    value = np.asarray(value)
    return value.item() if value.size == 1 else value.tolist()


class Progress:
    """A one-line progress report with throughput and ETA."""

    def __init__(self, total_steps: int, start_step: int):
        self.total_steps = total_steps
        self._last_step = start_step
        self._last_time = time.time()

    def tick(self, step: int, batch_size: int) -> tuple[float, str]:
        """Returns (images per second since the last tick, a progress line)."""
        now = time.time()
        steps = max(step - self._last_step, 1)
        seconds_per_step = (now - self._last_time) / steps
        self._last_step, self._last_time = step, now
        eta = seconds_per_step * (self.total_steps - step)
        line = (
            f"step {step}/{self.total_steps} ({100 * step / self.total_steps:.0f}%), "
            f"{batch_size / seconds_per_step:.1f} img/s, ETA {eta / 60:.1f} min"
        )
        return batch_size / seconds_per_step, line
