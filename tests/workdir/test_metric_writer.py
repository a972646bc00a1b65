"""metrics.jsonl and TensorBoard events, read back by TensorFlow's own reader."""

import json
import logging
import os

import numpy as np
import tensorflow as tf

from landmark_jax.workdir import metric_writer


def _events(workdir):
    """{file: [(step, {tag: value})]} through tf.compat.v1's event reader."""
    folder = os.path.join(workdir, metric_writer.TENSORBOARD_DIR)
    found = {}
    for name in sorted(os.listdir(folder)):
        rows = []
        for event in tf.compat.v1.train.summary_iterator(os.path.join(folder, name)):
            if event.HasField("summary"):
                rows.append((event.step, {v.tag: v.simple_value for v in event.summary.value}))
            else:
                assert event.file_version == "brain.Event:2"
        found[name] = rows
    return found


def test_rows_and_tensorboard_scalars_round_trip(tmp_path):
    writer = metric_writer.MetricWriter(str(tmp_path))
    writer.write(1, {"loss": np.float32(2.5), "learning_rate": 0.1, "hist": np.arange(2)})
    writer.write(2, {"loss": 1.25, "learning_rate": 0.1, "hist": np.arange(2)})
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert rows == [
        {"step": 1, "loss": 2.5, "learning_rate": 0.1, "hist": [0, 1]},
        {"step": 2, "loss": 1.25, "learning_rate": 0.1, "hist": [0, 1]},
    ]
    (events,) = _events(str(tmp_path)).values()
    # Scalars only (the list-valued 'hist' stays in metrics.jsonl).
    assert events == [
        (1, {"loss": 2.5, "learning_rate": np.float32(0.1)}),
        (2, {"loss": 1.25, "learning_rate": np.float32(0.1)}),
    ]


def test_a_resumed_run_drops_the_rows_its_crash_lost_and_keeps_the_rest(tmp_path):
    first = metric_writer.MetricWriter(str(tmp_path))
    for step in (1, 2, 3):
        first.write(step, {"loss": float(step)})
    # The run crashed after its step-2 checkpoint; the new segment resumes at 2.
    resumed = metric_writer.MetricWriter(str(tmp_path))
    resumed.truncate_after(2)
    resumed.write(3, {"loss": 30.0})
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [(r["step"], r["loss"]) for r in rows] == [(1, 1.0), (2, 2.0), (3, 30.0)]
    # One event file per segment, each with what that segment logged.
    segments = sorted(_events(str(tmp_path)).values(), key=len)
    assert segments == [[(3, {"loss": 30.0})], [(s, {"loss": float(s)}) for s in (1, 2, 3)]]


ROW = {"loss": 1.5, "learning_rate": 0.25}


def _line(step):
    return json.dumps({"step": step, **ROW}) + "\n"


def _record_writes(monkeypatch):
    """[(function, file name, bytes)] of every write through file_io."""
    writes = []
    for name in ("write_bytes", "append_bytes"):
        original = getattr(metric_writer.file_io, name, None)

        def record(path, data, name=name, original=original):
            writes.append((name, os.path.basename(path), len(data)))
            original(path, data)

        monkeypatch.setattr(metric_writer.file_io, name, record, raising=False)
    return writes


def test_a_local_log_step_appends_its_own_row_only(tmp_path, monkeypatch):
    """Each log step costs its own row, not the rows before it (was: both
    files rewritten whole at every step, quadratic over a run)."""
    writer = metric_writer.MetricWriter(str(tmp_path))
    writes = _record_writes(monkeypatch)
    for step in range(1, 31):
        writer.write(step, ROW)
    metrics = [w for w in writes if w[1] == "metrics.jsonl"]
    assert metrics == [("append_bytes", "metrics.jsonl", len(_line(s))) for s in range(1, 31)]
    events = [w for w in writes if w[1] != "metrics.jsonl"]
    assert len(events) == 30 and {w[0] for w in events} == {"append_bytes"}
    # The first append carries the file's header event too; then one event each.
    sizes = [n for _, _, n in events]
    assert len(set(sizes[1:])) == 1 and sizes[0] > sizes[1]
    (events_file,) = os.listdir(tmp_path / metric_writer.TENSORBOARD_DIR)
    assert sum(sizes) == os.path.getsize(tmp_path / metric_writer.TENSORBOARD_DIR / events_file)
    assert (tmp_path / "metrics.jsonl").read_text() == "".join(map(_line, range(1, 31)))
    (rows,) = _events(str(tmp_path)).values()
    assert rows == [(s, {"loss": 1.5, "learning_rate": 0.25}) for s in range(1, 31)]


def test_in_a_bucket_rows_go_to_bounded_pieces_read_back_in_order(tmp_path, monkeypatch):
    """Where files cannot be appended to (a bucket), the newest piece of at
    most rows_per_piece rows is rewritten, a new one started when it is full,
    and TensorBoard gets one event file per piece; a resume truncates them."""
    monkeypatch.setattr(metric_writer.file_io, "can_append", lambda path: False)
    writer = metric_writer.MetricWriter(str(tmp_path), rows_per_piece=3)
    writes = _record_writes(monkeypatch)
    for step in range(1, 8):
        writer.write(step, ROW)
    pieces = {
        "metrics.jsonl": [1, 2, 3],
        "metrics.part-00001.jsonl": [4, 5, 6],
        "metrics.part-00002.jsonl": [7],
    }
    for name, steps in pieces.items():
        assert (tmp_path / name).read_text() == "".join(map(_line, steps))
    # The largest upload is one full piece, whatever the run's length.
    assert max(n for _, name, n in writes if name in pieces) == 3 * len(_line(1))
    assert [r["step"] for r in metric_writer.read_rows(str(tmp_path))] == list(range(1, 8))
    events = _events(str(tmp_path))
    assert [[s for s, _ in rows] for rows in events.values()] == [[1, 2, 3], [4, 5, 6], [7]]

    # Resumed from step 4's checkpoint: rows 5-7 go; the next row continues piece 1.
    resumed = metric_writer.MetricWriter(str(tmp_path), rows_per_piece=3)
    resumed.truncate_after(4)
    assert not (tmp_path / "metrics.part-00002.jsonl").exists()
    resumed.write(5, {"loss": 50.0})
    rows = metric_writer.read_rows(str(tmp_path))
    assert [(r["step"], r["loss"]) for r in rows] == [(s, 1.5) for s in range(1, 5)] + [(5, 50.0)]
    assert (tmp_path / "metrics.part-00001.jsonl").read_text().count("\n") == 2


def test_pieces_in_a_tensorflow_filesystem_read_back_in_order():
    workdir = "ram://metric_writer_pieces/run"
    writer = metric_writer.MetricWriter(workdir, tensorboard=False, rows_per_piece=2)
    for step in range(1, 6):
        writer.write(step, ROW)
    assert [r["step"] for r in metric_writer.read_rows(workdir)] == [1, 2, 3, 4, 5]
    assert metric_writer.file_io.exists(f"{workdir}/metrics.part-00002.jsonl")


def test_a_partial_last_line_is_skipped_with_a_warning_naming_it(tmp_path, caplog):
    """A write cut short by a kill leaves half a row: the resume names the
    file and line and goes on without it (was: a bare JSONDecodeError)."""
    path = tmp_path / "metrics.jsonl"
    path.write_text(_line(1) + _line(2) + '{"step": 3, "loss": 1.0')
    with caplog.at_level(logging.WARNING):
        # Not yet resumed: the next row starts a line of its own.
        metric_writer.MetricWriter(str(tmp_path)).write(3, ROW)
        assert [r["step"] for r in metric_writer.read_rows(str(tmp_path))] == [1, 2, 3]
    assert f"{path}:3: not a complete metrics row (a write cut short?)" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        metric_writer.MetricWriter(str(tmp_path)).truncate_after(2)
    assert f"{path}:3: not a complete metrics row" in caplog.text
    assert path.read_text() == _line(1) + _line(2)
