"""Loads configs/NAME.py the way ml_collections' config_flags does (by path)."""

import importlib.util
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
