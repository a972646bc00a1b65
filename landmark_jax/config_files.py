"""Configs by path, as `--config=configs/NAME.py[:ARG]` reads them, for notebooks and scripts.

    config = config_files.load("configs/glr2020_retrieval.py:clean")
    config_files.override(config, {"data_dir": "gs://b/clean", "init.backbone": "gs://b/b7"})

is what `python -m landmark_jax.train --config=configs/glr2020_retrieval.py:clean
--config.data_dir=gs://b/clean --config.init.backbone=gs://b/b7` builds, so a
notebook cell and a command line train the same run.
"""

from __future__ import annotations

import difflib
import importlib.util
import os
from collections.abc import Mapping
from typing import Any

import ml_collections


def load(spec: str) -> ml_collections.ConfigDict:
    """A config file's `get_config(ARG)`.

    Args:
      spec: 'PATH' or 'PATH:ARG', e.g. 'configs/demo.py:smoke' (PATH relative
        to the working directory, as on the command line).

    Returns:
      The ConfigDict the file's get_config returns (get_config() without ARG).

    Raises:
      FileNotFoundError: no such config file.
      ValueError: the file has no get_config, or it refused ARG.
    """
    path, sep, arg = spec.partition(":")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file {path!r} not found (from {os.getcwd()})")
    name = os.path.splitext(os.path.basename(path))[0]
    module_spec = importlib.util.spec_from_file_location(f"landmark_config_{name}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ValueError(f"{path}: no get_config function")
    return module.get_config(arg) if sep else module.get_config()


def override(
    config: ml_collections.ConfigDict, values: Mapping[str, Any]
) -> ml_collections.ConfigDict:
    """Sets dotted keys on a config in place, like `--config.KEY=VALUE` flags.

    Args:
      config: the config to change.
      values: {dotted key: value}, e.g. {'optimizer.learning_rate': 0.1}.

    Returns:
      The same config.

    Raises:
      ValueError: a key the config does not have (with the closest one), or a
        value of the wrong type for its key.
    """
    for key, value in values.items():
        target = config
        *parents, leaf = key.split(".")
        for depth, name in enumerate([*parents, leaf]):
            if not isinstance(target, ml_collections.ConfigDict) or name not in target:
                where = ".".join([*parents, leaf][:depth]) or "the config"
                known = list(target.keys()) if isinstance(target, ml_collections.ConfigDict) else []
                close = difflib.get_close_matches(name, known, n=1)
                hint = f'; did you mean "{close[0]}"?' if close else ""
                raise ValueError(f"{key}: {where} has no key {name!r}{hint}")
            if depth < len(parents):
                target = target[name]
        try:
            target[leaf] = value
        except TypeError as e:
            raise ValueError(f"{key}={value!r}: {e}") from e
    return config
