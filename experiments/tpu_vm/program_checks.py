"""Checking the commands of experiments/tpu_vm/tpu_job.py before anything runs.

Every `python -m landmark_jax.train|evaluate` command of the job parsed by
the program's own flag parser with its real config file
(parse_program_flags) and checked by the program's own config checks
(check_command, check_commands), and the variant of ENSEMBLE_CONFIG that a
set of --member names is (ensemble_variant, _load_config_module).
"""

from __future__ import annotations

import copy
import importlib.util
import os
import shlex
import tempfile
from collections.abc import Mapping, Sequence
from typing import Any

from absl import flags
from recipes import ENSEMBLE_CONFIG, REPO_ROOT, Job, num_devices
from worker_commands import program_commands

# Config keys holding paths in the bucket, or made by an earlier stage: they
# exist on the workers when the step runs, not necessarily here and now.
WORKER_PATH_KEYS = (
    "init.checkpoint",
    "init.backbone",
    "val.retrieval_solution",
    "eval.retrieval_solution",
    "eval.recognition_solution",
    "eval.revisited_data_dir",
)


def parse_program_flags(argv: Sequence[str]) -> flags.FlagValues:
    """A `python -m landmark_jax.train|evaluate ...` argv parsed as the program
    parses it: `--config` by ml_collections' config_flags from the config
    file (resolved in this clone) with every `--config.KEY=VALUE` override,
    `--workdir`, and the multi-host flags (landmark_jax.runtime.multihost's own).

    Args:
      argv: [python, '-m', module, flags...], as train_argv/evaluate_argv make.

    Returns:
      The parsed flags (`.config` the ConfigDict the program would get).

    Raises:
      ValueError: the program is not one of the two, or its parser refuses an
        argument (an unknown config key, a bad value or config arg); the
        message names the argument or key.
    """
    from ml_collections import config_flags

    from landmark_jax.runtime import multihost

    if (
        len(argv) < 3
        or argv[1] != "-m"
        or argv[2] not in ("landmark_jax.train", "landmark_jax.evaluate")
    ):
        raise ValueError(f"not a landmark_jax.train/evaluate command: {shlex.join(argv)}")
    args = list(argv[3:])
    for i, arg in enumerate(args):
        if arg.startswith("--config="):  # the workers' relative path, read from this clone
            args[i] = "--config=" + os.path.join(REPO_ROOT, arg.removeprefix("--config="))
    parser_argv = [argv[2], *args]
    values = flags.FlagValues()
    config_flags.DEFINE_config_file(
        "config", None, "The config file.", flag_values=values, sys_argv=parser_argv
    )
    flags.DEFINE_string("workdir", None, "The workdir.", flag_values=values)
    for flag in flags.FLAGS.get_flags_for_module(multihost):
        values[flag.name] = copy.deepcopy(flag)  # --tpu_pod and the cluster flags, unshared
    overrides = [a.split("=", 1)[0] for a in args if a.startswith("--config.")]
    try:
        left = values(parser_argv)
    except (KeyError, AttributeError) as e:
        # config_flags' answer to an override of a key the config lacks: the
        # key quoted, and for a leaf ml_collections' "Did you mean" line.
        key, _, hint = str(e.args[0] if e.args else e).partition("\n")
        raise ValueError(
            f"{shlex.join(argv)}: its config has no key {key.strip(chr(34) + chr(39))!r} "
            f"(among {', '.join(overrides)}){'; ' + hint if hint else ''}"
        ) from None
    except Exception as e:  # flags.Error, or the config file's own refusal
        raise ValueError(f"{shlex.join(argv)}: {type(e).__name__}: {e}") from None
    if len(left) > 1:
        raise ValueError(f"{shlex.join(argv)}: unexpected arguments {left[1:]}")
    if not values["config"].present:
        raise ValueError(f"{shlex.join(argv)}: no --config")
    return values


def check_command(job: Job, name: str, argv: Sequence[str]) -> None:
    """Refuses a program command that would fail at its start on the workers.

    Parses it with the program's own flags and config (parse_program_flags),
    then runs the program's own config checks: config_lib.validate_config
    with the slice's device count for training, eval_config.validate_eval_config for the
    evaluation. Paths of WORKER_PATH_KEYS are checked on the workers, not
    here (a local stand-in that exists takes their place).

    Args:
      job: the job (its accelerator type gives the device count).
      name: the step's name, for the message.
      argv: the program's argv.

    Raises:
      ValueError: naming the step, the command and the problem.
    """
    from landmark_jax import config_lib
    from landmark_jax.retrieval import eval_config

    try:
        config = parse_program_flags(argv).config.copy_and_resolve_references()
        with tempfile.TemporaryDirectory() as stand_in:
            for key in WORKER_PATH_KEYS:
                block, leaf = key.split(".")
                if config[block][leaf]:
                    config[block][leaf] = stand_in
            if argv[2] == "landmark_jax.train":
                config_lib.validate_config(config, num_devices(job.accelerator_type))
            else:
                eval_config.validate_eval_config(config)
    except ValueError as e:
        raise ValueError(f"step {name!r} would fail on the workers: {e}") from None


def check_commands(job: Job) -> None:
    """check_command on every program command of the job (see its docstring).

    Raises:
      ValueError: the first command refused, named.
    """
    for name, argv in program_commands(job):
        check_command(job, name, argv)


def _load_config_module(path: str) -> Any:
    """A config file (relative to REPO_ROOT) as a module, for its tables."""
    spec = importlib.util.spec_from_file_location(
        "tpu_job_" + os.path.basename(path).removesuffix(".py"), os.path.join(REPO_ROOT, path)
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def ensemble_variant(members: Mapping[str, str]) -> str:
    """The variant of ENSEMBLE_CONFIG whose members `members` names: every one
    of its members, and no other name.

    Raises:
      ValueError: the names are not exactly one variant's members; the message
        lists each variant's.
    """
    module = _load_config_module(ENSEMBLE_CONFIG)
    names = {v: sorted(module.get_config(v).eval.ensemble.keys()) for v in module.VARIANTS}
    given = set(members)
    for variant, members_of in names.items():
        if given <= set(members_of):
            missing = sorted(set(members_of) - given)
            if missing:
                raise ValueError(
                    f"--member: {ENSEMBLE_CONFIG}:{variant} also has member(s) {missing}: "
                    "give each one's NAME=WORKDIR"
                )
            return variant
    listing = "; ".join(f":{v} has {', '.join(n)}" for v, n in names.items())
    raise ValueError(
        f"--member names {sorted(given)} are not the members of one variant of "
        f"{ENSEMBLE_CONFIG} ({listing})"
    )
