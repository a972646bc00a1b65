"""metrics.jsonl and TensorBoard events, read back by TensorFlow's own reader."""

import json
import os

import numpy as np
import tensorflow as tf

from landmark_jax import metric_writer


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
