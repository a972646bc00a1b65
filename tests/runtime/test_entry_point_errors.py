"""The programs report a user's mistake in one line (entry_point_errors)."""

import subprocess
import sys

import ml_collections
import pytest
from configs_for_tests import REPO

from landmark_jax.runtime import entry_point_errors


def _run(*args):
    return subprocess.run(
        [sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=120
    )


@pytest.mark.e2e
def test_an_unknown_config_key_is_one_line_with_the_suggestion(tmp_path):
    train = ["-m", "landmark_jax.train", "--config=configs/demo.py:smoke", f"--workdir={tmp_path}"]
    result = _run(*train, "--config.optimizer.learnin_rate=0.1")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        "error: --config.optimizer.learnin_rate=0.1: the config has no key "
        "'learnin_rate'; did you mean \"learning_rate\"?"
    )
    assert "Traceback" not in result.stderr
    result = _run(*train, "--config.total_steps=many")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "error: flag --config.total_steps=many: invalid literal for int()" in result.stderr
    result = _run(*train[:2], "--config=configs/no_such_config.py", f"--workdir={tmp_path}")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.startswith(
        "error: --config=configs/no_such_config.py: Failed loading config file"
    )
    assert "No such file or directory: 'configs/no_such_config.py'" in result.stderr


PROGRAM = """
import sys
from landmark_jax.data import data_format
from landmark_jax.runtime import entry_point_errors
def main(argv):
    if sys.argv[1] == "project":
        data_format.read_num_classes("/no/such/data")
    int("not a number")  # a ValueError raised outside the project's code
entry_point_errors.run(main)
"""


def test_project_errors_are_one_line_and_others_keep_their_traceback():
    result = _run("-c", PROGRAM, "project")
    assert result.returncode == 1
    assert result.stderr.startswith("error: data_dir='/no/such/data': no such folder\n")
    assert "Traceback" not in result.stderr
    result = _run("-c", PROGRAM, "project", "--traceback")
    assert result.returncode == 1 and "Traceback" in result.stderr
    result = _run("-c", PROGRAM, "elsewhere")
    assert result.returncode == 1 and "Traceback" in result.stderr
    assert "ValueError: invalid literal for int()" in result.stderr


def test_the_message_names_the_flag_of_an_unknown_key():
    config = ml_collections.ConfigDict({"optimizer": {"learning_rate": 0.1}})
    with pytest.raises(AttributeError) as raised:
        config.optimizer.learnin_rate  # noqa: B018
    argv = ["train", "--config=c.py", "--config.optimizer.learnin_rate=1"]
    assert entry_point_errors.config_override_message(raised.value, argv) == (
        "--config.optimizer.learnin_rate=1: the config has no key 'learnin_rate'; "
        'did you mean "learning_rate"?'
    )


def test_every_program_refuses_positional_arguments_by_name():
    from absl import app

    entry_point_errors.refuse_arguments(["program"])
    with pytest.raises(app.UsageError, match=r"unexpected arguments: \['data', 'x'\]"):
        entry_point_errors.refuse_arguments(["program", "data", "x"])
