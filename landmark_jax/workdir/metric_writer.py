"""Training metrics to `metrics.jsonl` and TensorBoard, from process 0 only.

A log step costs only its own row, however long the run:
- Locally, both files are appended to: `<workdir>/metrics.jsonl` is one file
  of one JSON object per line, and each run segment has one TensorBoard
  event file.
- In a bucket, where an object cannot be appended to, rows go to pieces of
  at most ROWS_PER_PIECE rows: `metrics.jsonl` holds the first rows,
  `metrics.part-00001.jsonl`, `metrics.part-00002.jsonl`, ... the next ones.
  Only the newest piece is rewritten (whole, so a crash leaves every logged
  row readable), and TensorBoard gets a new event file every ROWS_PER_PIECE
  rows (it reads every event file of its folder, in name order).

`read_rows(workdir)` reads the rows back in order, from one file or from
pieces: every reader of a workdir's metrics goes through it. A line that is
not a complete row (a write cut short by a kill) is skipped with a warning
naming its file and line, and left out of the file at the next resume
(`truncate_after`). TensorBoard events are written with TensorBoard's own
record format and protos, through the same file layer as everything else.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import time
import uuid
from collections.abc import Mapping

import jax
import numpy as np
from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.summary.writer.record_writer import RecordWriter

from landmark_jax.runtime import file_io

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
# Rows per piece in a bucket: each log step uploads at most this many rows
# (about 40 KB with the trainer's scalars), and a 25k-row run is 100 objects.
ROWS_PER_PIECE = 250
_PIECE_NAME = re.compile(r"metrics\.part-(\d+)\.jsonl")


def piece_path(workdir: str, index: int) -> str:
    """The path of metrics piece `index` (0: metrics.jsonl itself)."""
    name = METRICS_FILE if index == 0 else f"metrics.part-{index:05d}.jsonl"
    return file_io.join(workdir, name)


def _pieces(workdir: str) -> list[tuple[int, str]]:
    """(index, path) of the workdir's metrics pieces that exist, in row order."""
    found = []
    if file_io.exists(piece_path(workdir, 0)):
        found.append((0, piece_path(workdir, 0)))
    for path in file_io.glob(file_io.join(workdir, "metrics.part-*.jsonl")):
        match = _PIECE_NAME.fullmatch(file_io.basename(path))
        if match:
            found.append((int(match.group(1)), path))
    return sorted(found)


def _parse(path: str) -> tuple[list[tuple[str, dict]], int]:
    """The complete rows of one piece as (line, row), and how many lines were
    skipped (each logged with its file and line)."""
    parsed, skipped = [], 0
    for number, line in enumerate(file_io.read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        if not isinstance(row, dict) or not isinstance(row.get("step"), int):
            logging.warning(
                "%s:%d: not a complete metrics row (a write cut short?); skipped: %.80r",
                path,
                number,
                line,
            )
            skipped += 1
            continue
        parsed.append((line, row))
    return parsed, skipped


def read_rows(workdir: str) -> list[dict]:
    """Every logged row of a workdir, in order, from metrics.jsonl and its pieces.

    Args:
      workdir: a training workdir (local or a URL).

    Returns:
      One dict per log step ({'step': int, ...}); [] when nothing was logged.
      Lines that are not complete rows are skipped, each with a warning
      naming its file and line.
    """
    rows = []
    for _, path in _pieces(workdir):
        rows += [row for _, row in _parse(path)[0]]
    return rows


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

    def __init__(
        self, workdir: str, tensorboard: bool = True, rows_per_piece: int = ROWS_PER_PIECE
    ):
        """Continues the workdir's metrics (see the module docstring).

        Args:
          workdir: the run's workdir (local or a URL).
          tensorboard: also write TensorBoard events.
          rows_per_piece: where files cannot be appended to, rows per piece
            and per event file.
        """
        self._active = jax.process_index() == 0
        self._workdir = workdir
        self._append = file_io.can_append(workdir)
        self._rows_per_piece = rows_per_piece
        self._events: RecordWriter | None = None
        if not self._active:
            return
        self._continue_last_piece()
        if tensorboard:
            # One event file per run segment (and per piece in a bucket),
            # named as TensorBoard expects; pieces sort after their first file.
            self._events_name = (
                f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}."
                f"{os.getpid()}.{uuid.uuid4().hex[:8]}"
            )
            self._events_piece = -1
            self._start_event_file()

    def _continue_last_piece(self) -> None:
        """Points the writer at the newest piece: appended to where files can be
        appended to, else continued while it has room, or the next one."""
        pieces = _pieces(self._workdir)
        self._piece, path = pieces[-1] if pieces else (0, piece_path(self._workdir, 0))
        self._lines: list[str] = []  # the current piece's lines (bucket only)
        self._newline_first = False
        if not file_io.exists(path):
            return
        if self._append:
            # A killed write can leave a partial last line: the next row starts
            # on a line of its own rather than being glued to it.
            data = file_io.read_bytes(path)
            self._newline_first = bool(data) and not data.endswith(b"\n")
            return
        self._lines = [line for line in file_io.read_text(path).splitlines() if line.strip()]
        if len(self._lines) >= self._rows_per_piece:
            self._piece, self._lines = self._piece + 1, []

    def _start_event_file(self) -> None:
        self._events_piece += 1
        suffix = f".{self._events_piece:05d}" if self._events_piece else ""
        self._events_path = file_io.join(self._workdir, TENSORBOARD_DIR, self._events_name + suffix)
        self._events_rows = 0
        self._records = _Records()
        self._events = RecordWriter(self._records)
        header = event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2")
        self._events.write(header.SerializeToString())

    def write(self, step: int, metrics: Mapping[str, float]) -> None:
        """Records `metrics` (python or numpy scalars) at `step`.

        Raises:
          OSError: a file cannot be written, with its path.
        """
        if not self._active:
            return
        row = {"step": int(step), **{k: _scalar(v) for k, v in metrics.items()}}
        line = json.dumps(row)
        path = piece_path(self._workdir, self._piece)
        if self._append:
            text = ("\n" if self._newline_first else "") + line + "\n"
            file_io.append_bytes(path, text.encode("utf-8"))
            self._newline_first = False
        else:
            self._lines.append(line)
            file_io.write_text(path, "".join(f"{x}\n" for x in self._lines))
            if len(self._lines) >= self._rows_per_piece:
                self._piece, self._lines = self._piece + 1, []
        if self._events is not None:
            self._write_event(row)

    def _write_event(self, row: dict) -> None:
        if not self._append and self._events_rows >= self._rows_per_piece:
            self._start_event_file()
        values = [
            summary_pb2.Summary.Value(tag=key, simple_value=float(value))
            for key, value in row.items()
            if key != "step" and isinstance(value, float | int)
        ]
        event = event_pb2.Event(
            wall_time=time.time(), step=row["step"], summary=summary_pb2.Summary(value=values)
        )
        self._events.write(event.SerializeToString())
        self._events_rows += 1
        if self._append:
            file_io.append_bytes(self._events_path, b"".join(self._records.chunks))
            self._records.chunks.clear()
        else:
            file_io.write_bytes(self._events_path, b"".join(self._records.chunks))

    def truncate_after(self, step: int) -> None:
        """Drops rows past `step`: a resumed run rewrites what its crash lost.

        Lines that are not complete rows are dropped too (each warned about
        with its file and line). Only the pieces that change are rewritten;
        a piece left empty is removed (metrics.jsonl is kept, empty).

        Raises:
          OSError: a piece cannot be rewritten, with its path.
        """
        if not self._active:
            return
        for index, path in _pieces(self._workdir):
            parsed, skipped = _parse(path)
            kept = [line for line, row in parsed if row["step"] <= step]
            if len(kept) == len(parsed) and not skipped:
                continue
            if len(kept) < len(parsed):
                logging.info(
                    "%s: dropping %d rows logged past step %d, the step the run resumes from",
                    path,
                    len(parsed) - len(kept),
                    step,
                )
            if kept or index == 0:
                file_io.write_text(path, "".join(f"{x}\n" for x in kept))
            else:
                file_io.remove(path)
        self._continue_last_piece()


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
