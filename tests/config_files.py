"""Loads configs/NAME.py the way ml_collections' config_flags does (by path)."""

import importlib.util
import json
import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(name: str, arg: str | None = None):
    """configs/NAME.py's get_config(arg)."""
    spec = importlib.util.spec_from_file_location(name, f"{REPO}/configs/{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def set_keys(config, **overrides):
    """Sets dotted keys ('optimizer.learning_rate') on a config; returns it."""
    for key, value in overrides.items():
        target = config
        *parents, leaf = key.split(".")
        for p in parents:
            target = target[p]
        target[leaf] = value
    return config


def config_for(data_dir: str, **overrides):
    """The demo smoke config on `data_dir`: a log line per step, a constant
    learning rate (so a run's length does not change its losses), overrides."""
    config = load_config("demo", "smoke")
    config.data_dir = data_dir
    config.log_every_steps = 1
    config.optimizer.schedule = "constant"
    return set_keys(config, **overrides)


def losses_of(workdir: str) -> dict[int, float]:
    """{step: loss} of a run's metrics.jsonl."""
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return {row["step"]: row["loss"] for row in map(json.loads, f)}
