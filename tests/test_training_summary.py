"""training_summary's curves: each point where the axes put it."""

import json
import os

import pytest
from PIL import Image

from landmark_jax import training_summary


def test_training_curves_put_each_point_where_it_belongs(tmp_path):
    rows = [
        {"step": 10, "loss": 5.0},
        {"step": 20, "loss": float("nan"), "val_loss": 3.0},  # a NaN is left out
        {"step": 30, "loss": 1.0},
    ]
    with open(tmp_path / "metrics.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    png = tmp_path / "curves.png"
    png.write_bytes(training_summary.curves_png(str(tmp_path)))
    image = Image.open(png).convert("RGB")
    # One panel (only the loss keys have values), 360 x 220, its plot area
    # inside margins of 60 / 22 / 12 / 26 px: x 60..348, y 22..194. Steps
    # 10..30 span the width and losses 1..5 the height, higher up.
    assert image.size == (360, 220)
    loss, val_loss = training_summary.SERIES_COLORS
    assert image.getpixel((60, 22)) == loss  # step 10, loss 5: top left
    assert image.getpixel((348, 194)) == loss  # step 30, loss 1: bottom right
    assert image.getpixel((204, 108)) == val_loss  # step 20, 3.0: the middle
    assert image.getpixel((204, 30)) == (255, 255, 255)  # no NaN point drawn up there

    with open(tmp_path / "metrics.jsonl", "w") as f:
        f.write(json.dumps({"step": 1, "images_per_sec": 9.0}) + "\n")
    with pytest.raises(ValueError, match="metrics.jsonl has none of the keys"):
        training_summary.render_curves(str(tmp_path))
    os.remove(tmp_path / "metrics.jsonl")
    with pytest.raises(FileNotFoundError, match="metrics.jsonl not found"):
        training_summary.render_curves(str(tmp_path))
