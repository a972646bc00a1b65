"""Training metrics to `metrics.jsonl` and TensorBoard, from process 0 only.

Both files are rewritten whole at each log step through `file_io`, so they
work in a bucket (an object cannot be appended to; TensorFlow's own summary
writer re-uploads its whole file at each flush too) and a crash leaves every
logged row readable. TensorBoard events are written with TensorBoard's own
record format and protos, through the same file layer as everything else.
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from collections.abc import Mapping

import jax
import numpy as np
from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.summary.writer.record_writer import RecordWriter

from landmark_jax import file_io

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


class _Records:
    """Collects TFRecord-framed bytes (RecordWriter writes to any file-like)."""

    def __init__(self):
        self.chunks: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.chunks.append(data)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


class MetricWriter:
    """Records one JSON object per log step and mirrors scalars to TensorBoard.

    On processes other than 0 every method does nothing, so the train loop
    calls it unconditionally.
    """

    def __init__(self, workdir: str, tensorboard: bool = True):
        self._active = jax.process_index() == 0
        self._path = file_io.join(workdir, METRICS_FILE)
        self._rows: list[str] = []
        self._events: RecordWriter | None = None
        if not self._active:
            return
        if file_io.exists(self._path):
            self._rows = [line for line in file_io.read_text(self._path).splitlines() if line]
        if tensorboard:
            # One event file per run segment, named as TensorBoard expects.
            name = (
                f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}."
                f"{os.getpid()}.{uuid.uuid4().hex[:8]}"
            )
            self._events_path = file_io.join(workdir, TENSORBOARD_DIR, name)
            self._records = _Records()
            self._events = RecordWriter(self._records)
            header = event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2")
            self._events.write(header.SerializeToString())

    def write(self, step: int, metrics: Mapping[str, float]) -> None:
        """Records `metrics` (python or numpy scalars) at `step`."""
        if not self._active:
            return
        row = {"step": int(step), **{k: _scalar(v) for k, v in metrics.items()}}
        self._rows.append(json.dumps(row))
        file_io.write_text(self._path, "\n".join(self._rows) + "\n")
        if self._events is not None:
            values = [
                summary_pb2.Summary.Value(tag=key, simple_value=float(value))
                for key, value in row.items()
                if key != "step" and isinstance(value, float | int)
            ]
            event = event_pb2.Event(
                wall_time=time.time(), step=int(step), summary=summary_pb2.Summary(value=values)
            )
            self._events.write(event.SerializeToString())
            file_io.write_bytes(self._events_path, b"".join(self._records.chunks))

    def truncate_after(self, step: int) -> None:
        """Drops rows past `step`: a resumed run rewrites what its crash lost."""
        if not self._active or not self._rows:
            return
        kept = [line for line in self._rows if json.loads(line)["step"] <= step]
        if len(kept) != len(self._rows):
            self._rows = kept
            file_io.write_text(self._path, "".join(line + "\n" for line in kept))


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
