"""landmark_jax.config_files: configs by path and dotted overrides, as --config reads them."""

import pytest
from configs_for_tests import REPO

from landmark_jax import config_files


def test_load_and_override_as_the_command_line(monkeypatch):
    monkeypatch.chdir(REPO)
    config = config_files.load("configs/glr2021_dolg.py:step2,smoke")
    assert config.image_size == 48 and config.init.carry == "all"
    # A smoke run (all compiling) takes XLA's convolutions; the recipe keeps 'auto'.
    assert config.model.conv_lowering == "xla"
    assert config_files.load("configs/glr2021_dolg.py:step2").model.conv_lowering == "auto"
    assert config_files.load("configs/demo.py").total_steps == 1000  # no arg: get_config()
    same = config_files.override(config, {"optimizer.learning_rate": 0.5, "data_dir": "gs://b/x"})
    assert same is config
    assert config.optimizer.learning_rate == 0.5 and config.data_dir == "gs://b/x"


def test_bad_paths_keys_and_values_are_named(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    with pytest.raises(FileNotFoundError, match="config file 'configs/nope.py' not found"):
        config_files.load("configs/nope.py:smoke")
    with pytest.raises(ValueError, match="configs/demo.py: unknown arg 'big'"):
        config_files.load("configs/demo.py:big")
    (tmp_path / "empty.py").write_text("x = 1\n")
    with pytest.raises(ValueError, match="empty.py: no get_config function"):
        config_files.load(str(tmp_path / "empty.py"))
    config = config_files.load("configs/demo.py:smoke")
    with pytest.raises(
        ValueError,
        match=r"optimizer.learnin_rate: optimizer has no key "
        r"'learnin_rate'; did you mean \"learning_rate\"\?",
    ):
        config_files.override(config, {"optimizer.learnin_rate": 0.1})
    with pytest.raises(ValueError, match="optimiser.momentum: the config has no key 'optimiser'"):
        config_files.override(config, {"optimiser.momentum": 0.1})
    with pytest.raises(ValueError, match="data_dir.x: data_dir has no key 'x'"):
        config_files.override(config, {"data_dir.x": 1})
    with pytest.raises(ValueError, match=r"total_steps='many': "):
        config_files.override(config, {"total_steps": "many"})
