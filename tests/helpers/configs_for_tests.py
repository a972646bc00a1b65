"""Loads configs/NAME.py the way ml_collections' config_flags does (by path)."""

import os

from landmark_jax import config_files
from landmark_jax.workdir import metric_writer

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def load_config(name: str, arg: str | None = None):
    """configs/NAME.py's get_config(arg)."""
    path = f"{REPO}/configs/{name}.py"
    return config_files.load(path if arg is None else f"{path}:{arg}")


def set_keys(config, **overrides):
    """Sets dotted keys ('optimizer.learning_rate') on a config; returns it."""
    return config_files.override(config, overrides)


def config_for(data_dir: str, **overrides):
    """The demo smoke config on `data_dir`: a log line per step, a constant
    learning rate (so a run's length does not change its losses), overrides."""
    config = load_config("demo", "smoke")
    config.data_dir = data_dir
    config.log_every_steps = 1
    config.optimizer.schedule = "constant"
    return set_keys(config, **overrides)


def losses_of(workdir: str) -> dict[int, float]:
    """{step: loss} of a run's metrics (metrics.jsonl and any pieces)."""
    return {row["step"]: row["loss"] for row in metric_writer.read_rows(workdir)}
