r"""A recipe's whole chain of stages as one Cloud TPU VM batch job, safe to re-run.

    python experiments/tpu_vm/tpu_job.py --recipe=glr2020 --tpu=lm-b7 --zone=us-central2-b \
        --accelerator_type=v4-32 --spot --repo=https://github.com/OWNER/landmark_jax.git \
        --root=gs://BUCKET/runs --data_clean=gs://BUCKET/tfds/gldv2/clean \
        --data_full=gs://BUCKET/tfds/gldv2/full --backbone_weights=gs://BUCKET/weights/b7 \
        --retrieval_solution=gs://BUCKET/gldv2/retrieval_solution_v2.1.csv [--dry_run]

Before anything runs (and with `--dry_run`), every `python -m landmark_jax.*`
command of the job is parsed by the programs' own flag parser with its real
config file (`check_command`): an unknown config key, a stage arg or an
ensemble member name the config lacks, or a value its config checks refuse
(config_lib.validate_config for training, validate_eval_config for the
evaluation) stops the job at once, naming the step, not after days of
training. Paths that live in the bucket, or that an earlier stage makes, are
checked on the workers.

What it runs, in order (each a `gcloud` command; `--dry_run` prints them all
and runs nothing):

1. Create the TPU VM or pod slice, unless it exists and is READY
   (`gcloud compute tpus tpu-vm create`; `--spot` for spot capacity). With
   `--queued`, a queued resource (`queued-resources create`) instead: the job
   polls it (`queued-resources describe --format=json`, every
   `--poll_seconds`, a progress line on each change of state and every 10
   minutes) through CREATING/ACCEPTED, WAITING_FOR_RESOURCES and
   PROVISIONING until it is ACTIVE, for at most `--queued_timeout_hours`
   (then it stops and leaves the request queued). A request that exists
   already is waited on, never created twice (re-running the job while it
   waits); a SUSPENDED one (a preempted spot slice: its node is gone) or a
   FAILED one is deleted and queued again; SUSPENDING and DELETING are
   waited out first.
2. Install the project on every worker (`--worker=all`): clone `--repo` at
   `--ref`, `pip install -e .` and JAX for TPUs.
3. Each stage of the recipe on all workers at once, `python -m
   landmark_jax.train` with `--tpu_pod` on a multi-host slice; each stage's
   workdir is `<root>/<recipe>/<stage>`, its `init.checkpoint` the previous
   stage's workdir, the first stage's `init.backbone` the converted ImageNet
   weights; every worker's log goes to `<root>/<recipe>/logs/`.
4. The evaluation of the last stage, or of an ensemble (`--member
   NAME=WORKDIR` for each member of one variant of
   configs/glr2020_ensemble.py: the variant is the one whose members the
   names are, e.g. b7_640... for `:released`, b7, b6, b5_a, b5_b for
   `:article`). The evaluation computes only what it scores or writes: GLR2020
   (retrieval) embeds the index and test splits, GLR2021 (recognition) the
   train split too, for its recognition submission
   (`--config.eval.recognition_submission`, stated in each command).

Re-running the job after a preemption or a failure resumes where it stopped:
a finished stage returns at once (its checkpoint is at total_steps), an
interrupted one resumes from its latest checkpoint, and nothing is redone.
Within one run, a stage that fails is retried up to `--max_attempts` times;
before each retry the TPU's (or queued resource's) state is read, and a
preempted (or deleted) TPU is deleted, created again and set up again first.

Recipes (RECIPES): glr2020 = configs/glr2020_retrieval.py clean (GLDv2-clean,
512) -> full (GLDv2, 512) -> full640 -> full736 -> notclean; glr2021 =
configs/glr2021_dolg.py step1 (GLDv2-clean, 256) -> step2 (GLDv2x, 448) ->
step3 (768).
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from absl import app, flags, logging

# The clone this script is in: the config files the workers will read are
# read here from the same paths (the dry run's checks).
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@dataclasses.dataclass(frozen=True)
class Stage:
    """One training run of a recipe: its config arg and the data folder it reads."""

    name: str
    config: str  # configs/FILE.py:ARG
    data: str  # a key of Job.data: 'clean', 'full' or 'x'


@dataclasses.dataclass(frozen=True)
class Recipe:
    stages: tuple[Stage, ...]
    evaluation: str  # the config `evaluate` reads for the last stage
    # Whether the evaluation labels the test images (kNN against the train
    # split: embedding every train image) and writes recognition_submission.csv
    # without a recognition solution: GLR2021 was the recognition competition,
    # GLR2020 the retrieval one (its 4.1M train images would be embedded for
    # nothing). The recipe's config says the same; the job's command states it.
    recognition_submission: bool


RECIPES: dict[str, Recipe] = {
    "glr2020": Recipe(
        stages=(
            Stage("clean", "configs/glr2020_retrieval.py:clean", "clean"),
            Stage("full", "configs/glr2020_retrieval.py:full", "full"),
            Stage("full640", "configs/glr2020_retrieval.py:full640", "full"),
            Stage("full736", "configs/glr2020_retrieval.py:full736", "full"),
            Stage("notclean", "configs/glr2020_retrieval.py:notclean", "full"),
        ),
        evaluation="configs/glr2020_retrieval.py:notclean",
        recognition_submission=False,
    ),
    "glr2021": Recipe(
        stages=(
            Stage("step1", "configs/glr2021_dolg.py:step1", "clean"),
            Stage("step2", "configs/glr2021_dolg.py:step2", "x"),
            Stage("step3", "configs/glr2021_dolg.py:step3", "x"),
        ),
        evaluation="configs/glr2021_dolg.py:step3",
        recognition_submission=True,
    ),
}
# GLR2020's ensembles (retrieval only: its eval.train_split is '').
ENSEMBLE_CONFIG = "configs/glr2020_ensemble.py"
SOURCE_DIR = "landmark_jax_src"  # the clone on every worker, in the home folder
# JAX for TPUs within the project's range (setup.py).
JAX_TPU = "jax[tpu]>=0.10.0,<0.13"
# The TPU VM images' Python is older than the project's (Ubuntu 22.04: 3.10),
# so the install makes a Python 3.12 venv in the clone with uv, as `make`
# makes .venv; the programs run with its interpreter (from the clone).
PYTHON_VERSION = "3.12"
PYTHON = ".venv/bin/python"

# Queued resource states (the Cloud TPU API's QueuedResourceState.State).
# Waited on until ACTIVE: the request is being admitted, queued or provisioned.
QUEUED_WAITING = ("CREATING", "ACCEPTED", "WAITING_FOR_RESOURCES", "PROVISIONING")
# Waited out, then acted on: SUSPENDING ends SUSPENDED, DELETING ends gone.
QUEUED_ENDING = ("SUSPENDING", "DELETING")
# Deleted and queued again: a preempted spot request (node gone), or a failed one.
QUEUED_DEAD = ("SUSPENDED", "FAILED")
NOT_FOUND = "NOT_FOUND"  # no such queued resource (gcloud's error code)
PROGRESS_EVERY_S = 600.0  # a progress line at least this often while waiting


def num_hosts(accelerator_type: str) -> int:
    """Workers (hosts) of a TPU slice, from its accelerator type.

    v2/v3/v4/v5p types count TensorCores, 8 per host (v4-8: 1 host, v4-32: 4);
    v5litepod/v6e types count chips: up to 8 on one host, else 4 per host.

    Raises:
      ValueError: an accelerator type of another form, named.
    """
    family, count = _accelerator(accelerator_type)
    if family in ("v5litepod", "v6e"):
        return 1 if count <= 8 else count // 4
    return max(1, count // 8)


def num_devices(accelerator_type: str) -> int:
    """JAX devices of a TPU slice (what a global batch must be a multiple of).

    v2/v3: one per TensorCore (the type's count); v4/v5p: one per chip (two
    TensorCores as one megacore device, so half the count); v5litepod/v6e:
    one per chip (the count).

    Raises:
      ValueError: an accelerator type of another form, named.
    """
    family, count = _accelerator(accelerator_type)
    return max(1, count // 2) if family in ("v4", "v5p") else count


def _accelerator(accelerator_type: str) -> tuple[str, int]:
    match = re.fullmatch(r"(v2|v3|v4|v5p|v5litepod|v6e)-(\d+)", accelerator_type)
    if not match:
        raise ValueError(
            f"--accelerator_type={accelerator_type!r}: expected e.g. v3-8, v4-32, v5p-16, "
            "v5litepod-8 or v6e-16"
        )
    return match.group(1), int(match.group(2))


@dataclasses.dataclass(frozen=True)
class Job:
    """Everything the job's commands are built from (the command-line flags)."""

    recipe: str
    tpu: str
    zone: str
    accelerator_type: str
    root: str
    data: dict[str, str]
    backbone_weights: str
    repo: str
    ref: str = "main"
    version: str = "tpu-ubuntu2204-base"
    spot: bool = False
    queued: bool = False
    retrieval_solution: str = ""
    recognition_solution: str = ""
    members: dict[str, str] = dataclasses.field(default_factory=dict)
    ensemble_variant: str = "released"  # the arg of ENSEMBLE_CONFIG the members belong to

    def workdir(self, stage: str) -> str:
        return f"{self.root.rstrip('/')}/{self.recipe}/{stage}"


# --- gcloud commands -------------------------------------------------------------


def _tpu_args(job: Job) -> list[str]:
    return [job.tpu, f"--zone={job.zone}"]


def create_command(job: Job) -> list[str]:
    """The TPU VM's (or queued resource's) creation."""
    if job.queued:
        cmd = ["gcloud", "compute", "tpus", "queued-resources", "create", job.tpu]
        cmd += [f"--node-id={job.tpu}", f"--zone={job.zone}"]
        cmd += [f"--accelerator-type={job.accelerator_type}", f"--runtime-version={job.version}"]
    else:
        cmd = ["gcloud", "compute", "tpus", "tpu-vm", "create", *_tpu_args(job)]
        cmd += [f"--accelerator-type={job.accelerator_type}", f"--version={job.version}"]
    return cmd + (["--spot"] if job.spot else [])


def state_command(job: Job) -> list[str]:
    """Prints the TPU's state (READY, PREEMPTED, ...); fails if it does not exist."""
    return ["gcloud", "compute", "tpus", "tpu-vm", "describe", *_tpu_args(job)] + [
        "--format=value(state)"
    ]


def queued_describe_command(job: Job) -> list[str]:
    """The queued resource as JSON (its state in `state.state`); fails with
    NOT_FOUND if there is none."""
    return ["gcloud", "compute", "tpus", "queued-resources", "describe", *_tpu_args(job)] + [
        "--format=json"
    ]


def delete_command(job: Job) -> list[str]:
    if job.queued:
        # --force: the request's node too.
        return ["gcloud", "compute", "tpus", "queued-resources", "delete", job.tpu] + [
            f"--zone={job.zone}",
            "--force",
            "--quiet",
        ]
    return ["gcloud", "compute", "tpus", "tpu-vm", "delete", *_tpu_args(job), "--quiet"]


def on_all_workers(job: Job, script: str) -> list[str]:
    """`script` run by bash on every worker of the slice at once."""
    return ["gcloud", "compute", "tpus", "tpu-vm", "ssh", *_tpu_args(job), "--worker=all"] + [
        f"--command={script}"
    ]


# --- What runs on the workers ----------------------------------------------------


def install_script(job: Job) -> str:
    """Clones (or updates) the project at job.ref and installs it with JAX for
    TPUs into a Python PYTHON_VERSION venv made by uv (installed if missing)."""
    src, ref = SOURCE_DIR, shlex.quote(job.ref)
    return (
        "set -euo pipefail; cd $HOME; "
        f"if [ -d {src} ]; then git -C {src} fetch -q --depth 1 origin {ref} && "
        f"git -C {src} checkout -q --force FETCH_HEAD; "
        f"else git clone -q --depth 1 --branch {ref} {shlex.quote(job.repo)} {src}; fi; "
        'export PATH="$HOME/.local/bin:$PATH"; '
        "command -v uv >/dev/null || curl -LsSf https://astral.sh/uv/install.sh | sh; "
        f"[ -x {src}/{PYTHON} ] || uv venv -q --python {PYTHON_VERSION} {src}/.venv; "
        f"uv pip install -q --python {src}/{PYTHON} -e {src} {shlex.quote(JAX_TPU)}"
    )


def _logged(job: Job, name: str, argv: Sequence[str]) -> str:
    """argv run in the clone, its output kept in a log copied to the bucket."""
    # Every user value (root, recipe, stage name) is shell-quoted: the script
    # runs under bash on every worker, and only $HOME and $(hostname) are the
    # worker's to expand.
    logs = f"{job.root.rstrip('/')}/{job.recipe}/logs"
    log = "$HOME/" + shlex.quote(f"{job.recipe}-{name}.log")
    target = shlex.quote(f"{logs}/{name}-") + '"$(hostname).log"'
    return (
        f"set -o pipefail; cd $HOME/{shlex.quote(SOURCE_DIR)}; "
        + " ".join(shlex.quote(a) for a in argv)
        + f" 2>&1 | tee -a {log}; rc=$?; gsutil -q cp {log} {target}; "
        "exit $rc"
    )


def train_argv(job: Job, index: int) -> list[str]:
    """`python -m landmark_jax.train` for the recipe's stage number `index`."""
    recipe = RECIPES[job.recipe]
    stage = recipe.stages[index]
    argv = [PYTHON, "-m", "landmark_jax.train", f"--config={stage.config}"]
    argv += [f"--workdir={job.workdir(stage.name)}", f"--config.data_dir={job.data[stage.data]}"]
    if index == 0:
        argv.append(f"--config.init.backbone={job.backbone_weights}")
    else:
        argv.append(f"--config.init.checkpoint={job.workdir(recipe.stages[index - 1].name)}")
    if num_hosts(job.accelerator_type) > 1:
        argv.append("--tpu_pod")
    return argv


def evaluate_argv(job: Job) -> list[str]:
    """`python -m landmark_jax.evaluate` of the last stage, or of the ensemble."""
    recipe = RECIPES[job.recipe]
    last = recipe.stages[-1]
    if job.members:
        config = f"{ENSEMBLE_CONFIG}:{job.ensemble_variant}"
        argv = [PYTHON, "-m", "landmark_jax.evaluate", f"--config={config}"]
        argv += [f"--workdir={job.workdir('ensemble')}"]
        argv += [f"--config.eval.ensemble.{n}.workdir={w}" for n, w in job.members.items()]
    else:
        argv = [PYTHON, "-m", "landmark_jax.evaluate", f"--config={recipe.evaluation}"]
        argv += [f"--workdir={job.workdir(last.name)}"]
    argv.append(f"--config.data_dir={job.data[last.data]}")
    for key in ("retrieval_solution", "recognition_solution"):
        if getattr(job, key):
            argv.append(f"--config.eval.{key}={getattr(job, key)}")
    # Stated, not left to the config: whether the train split is embedded
    # when no recognition solution scores it (hours of TPU time on GLDv2).
    submission = recipe.recognition_submission and not job.members
    argv.append(f"--config.eval.recognition_submission={submission}")
    if num_hosts(job.accelerator_type) > 1:
        argv.append("--tpu_pod")
    return argv


def program_commands(job: Job) -> list[tuple[str, list[str]]]:
    """The job's program runs in order: (step name, python argv on the workers)."""
    recipe = RECIPES[job.recipe]
    named = [(stage.name, train_argv(job, i)) for i, stage in enumerate(recipe.stages)]
    return named + [("evaluate", evaluate_argv(job))]


def steps(job: Job) -> list[tuple[str, list[str]]]:
    """The job's worker steps in order: (name, gcloud ssh command)."""
    named = [("install", on_all_workers(job, install_script(job)))]
    for name, argv in program_commands(job):
        named.append((name, on_all_workers(job, _logged(job, name, argv))))
    return named


# --- Checking the programs' commands before anything runs ---------------------------

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
    `--workdir`, and the multi-host flags (landmark_jax.multihost's own).

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

    from landmark_jax import multihost

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
    with the slice's device count for training, validate_eval_config for the
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

    try:
        config = parse_program_flags(argv).config.copy_and_resolve_references()
        with tempfile.TemporaryDirectory() as stand_in:
            for key in WORKER_PATH_KEYS:
                block, leaf = key.split(".")
                if block in config and config[block].get(leaf):
                    config[block][leaf] = stand_in
            if argv[2] == "landmark_jax.train":
                config_lib.validate_config(config, num_devices(job.accelerator_type))
            else:
                config_lib.validate_eval_config(config)
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


# --- The job -----------------------------------------------------------------------

Runner = Callable[[list[str]], subprocess.CompletedProcess]


def _run(argv: list[str]) -> subprocess.CompletedProcess:
    """Runs a gcloud command: a worker step's output streams to this
    terminal; a describe/create/delete's is captured (the job reads it)."""
    logging.info("$ %s", shlex.join(argv))
    if "ssh" in argv[:5]:
        return subprocess.run(argv, text=True)
    return subprocess.run(argv, text=True, capture_output=True)


def _ensure_tpu(job: Job, run: Runner) -> bool:
    """Makes the TPU exist and be READY; True if it was (re)created."""
    state = run(state_command(job))
    current = state.stdout.strip() if state.returncode == 0 else "NOT_FOUND"
    if current == "READY":
        return False
    if current != "NOT_FOUND":
        logging.warning("TPU %s is %s: deleting it and creating it again", job.tpu, current)
        run(delete_command(job))
    result = run(create_command(job))
    if result.returncode != 0:
        raise RuntimeError(f"could not create TPU {job.tpu} in {job.zone}: {_said(result)}")
    return True


def _said(result: subprocess.CompletedProcess) -> str:
    """What a failed gcloud command said (_run captures it), for an error message."""
    return (result.stderr or "").strip() or "see gcloud's output above"


def queued_state(job: Job, run: Runner) -> tuple[str, str]:
    """The queued resource's state and, when FAILED, the reason it gives.

    Returns:
      (state, reason): `state.state` of `describe --format=json` (NOT_FOUND
      when there is no such queued resource), and `state.failedData.error.message`
      ('' when absent).

    Raises:
      RuntimeError: gcloud failed otherwise, or printed something else than
        a queued resource (its output quoted).
    """
    command = queued_describe_command(job)
    result = run(command)
    if result.returncode != 0:
        error = (result.stderr or "").strip()
        if NOT_FOUND in error:
            return NOT_FOUND, ""
        raise RuntimeError(f"`{shlex.join(command)}` failed (exit {result.returncode}): {error}")
    try:
        state = json.loads(result.stdout)["state"]
        reason = state.get("failedData", {}).get("error", {}).get("message", "")
        return str(state["state"]), str(reason)
    except (ValueError, KeyError, TypeError, AttributeError):
        raise RuntimeError(
            f"`{shlex.join(command)}` printed no queued resource state: {result.stdout[:500]!r}"
        ) from None


def _duration(seconds: float) -> str:
    minutes = int(seconds // 60)
    return f"{minutes // 60}h{minutes % 60:02d}m"


def _ensure_queued(
    job: Job,
    run: Runner,
    *,
    timeout_s: float,
    poll_seconds: float,
    clock: Callable[[], float],
    sleep: Callable[[float], None],
) -> bool:
    """Makes the queued resource ACTIVE, waiting on it; True if it was (re)created.

    An existing request is waited on (never created twice); a SUSPENDED or
    FAILED one is deleted and queued again (a request this call queued that
    FAILS is an error: queuing it again would fail the same way);
    SUSPENDING and DELETING are waited out. A progress line is logged at each
    change of state and at least every PROGRESS_EVERY_S.

    Raises:
      RuntimeError: not ACTIVE after timeout_s (the request stays queued: a
        re-run waits on it), a request of this call FAILED, or gcloud failed.
    """
    start = clock()
    created = False
    reported, reported_at = None, start
    where = f"queued resource {job.tpu} in {job.zone}"
    while True:
        state, reason = queued_state(job, run)
        now = clock()
        if state == "ACTIVE":
            logging.info("%s is ACTIVE (waited %s)", where, _duration(now - start))
            return created
        if state in QUEUED_DEAD:
            if created and state == "FAILED":
                raise RuntimeError(f"{where} FAILED: {reason or 'no reason given'}")
            logging.warning(
                "%s is %s%s: deleting it and queueing it again",
                where,
                state,
                f" ({reason})" if reason else "",
            )
            result = run(delete_command(job))
            if result.returncode != 0:
                raise RuntimeError(f"could not delete {where}: {_said(result)}")
            state = NOT_FOUND
        if state == NOT_FOUND:
            result = run(create_command(job))
            if result.returncode == 0:
                created = True
                logging.info("%s requested", where)
            elif "ALREADY_EXISTS" in (result.stderr or ""):
                # Another request of that name appeared meanwhile (another
                # run of the job): it is waited on like ours.
                logging.warning("%s exists already: waiting on it", where)
            else:
                raise RuntimeError(f"could not create {where}: {_said(result)}")
        elif state not in QUEUED_WAITING + QUEUED_ENDING:
            logging.warning("%s is in an unknown state %s: waiting", where, state)
        if now - start >= timeout_s:
            raise RuntimeError(
                f"{where} is still {state} after {_duration(now - start)} "
                f"(--queued_timeout_hours): it stays queued, and running the job again waits "
                f"on it; `gcloud compute tpus queued-resources delete {job.tpu} "
                f"--zone={job.zone} --force` gives it up"
            )
        # (A creation or deletion has its own line.)
        if state != NOT_FOUND and (state != reported or now - reported_at >= PROGRESS_EVERY_S):
            logging.info("%s is %s (waited %s)", where, state, _duration(now - start))
            reported, reported_at = state, now
        sleep(poll_seconds)


def _install(job: Job, run: Runner) -> None:
    if run(steps(job)[0][1]).returncode != 0:
        raise RuntimeError(f"installing the project on {job.tpu} failed; see the output above")


def run_job(
    job: Job,
    run: Runner = _run,
    max_attempts: int = 3,
    wait_seconds: float = 60.0,
    *,
    queued_timeout_s: float = 24 * 3600.0,
    poll_seconds: float = 60.0,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> None:
    """Runs every step (see the module docstring), retrying a failed one.

    Args:
      job: what to run.
      run: runs one command (subprocess.run by default; tests pass a fake).
      max_attempts: tries of each stage and of the evaluation.
      wait_seconds: pause before retrying on a TPU that is still READY.
      queued_timeout_s: with job.queued, the longest wait for the queued
        resource to become ACTIVE (each time it is (re)queued).
      poll_seconds: with job.queued, the pause between two reads of its state.
      clock: seconds, monotonic (tests pass a fake).
      sleep: pauses (tests pass a fake).

    Raises:
      RuntimeError: the TPU cannot be created or set up, a queued resource is
        not ACTIVE in time, or a step still fails after max_attempts tries
        (named).
    """

    def ensure() -> bool:
        if job.queued:
            return _ensure_queued(
                job,
                run,
                timeout_s=queued_timeout_s,
                poll_seconds=poll_seconds,
                clock=clock,
                sleep=sleep,
            )
        return _ensure_tpu(job, run)

    ensure()
    _install(job, run)  # quick when already installed: a fetch and a no-op pip
    for name, command in steps(job)[1:]:
        for attempt in range(1, max_attempts + 1):
            rc = run(command).returncode
            if rc == 0:
                break
            logging.warning(
                "%s failed (exit %d, attempt %d of %d)", name, rc, attempt, max_attempts
            )
            if attempt == max_attempts:
                raise RuntimeError(f"step {name!r} failed {max_attempts} times; see its logs")
            # Preempted (or deleted): a new TPU, set up again; the stage resumes
            # from its latest checkpoint in the bucket.
            if ensure():
                _install(job, run)
            else:
                sleep(wait_seconds)


# --- Command line ---------------------------------------------------------------------

FLAGS = flags.FLAGS


def define_flags() -> None:
    flags.DEFINE_enum("recipe", None, sorted(RECIPES), "The recipe whose stages run.")
    flags.DEFINE_string("tpu", None, "TPU VM (node) name; with --queued, the request's too.")
    flags.DEFINE_string("zone", None, "Cloud zone, e.g. us-central2-b.")
    flags.DEFINE_string("accelerator_type", "v4-8", "e.g. v3-8, v4-32, v5litepod-16.")
    flags.DEFINE_string("version", "tpu-ubuntu2204-base", "TPU VM software version.")
    flags.DEFINE_bool("spot", False, "Spot capacity (preemptible).")
    flags.DEFINE_bool("queued", False, "Create through a queued resource, and wait for it.")
    flags.DEFINE_float(
        "queued_timeout_hours", 24.0, "--queued: the longest wait for the request to be ACTIVE."
    )
    flags.DEFINE_float("poll_seconds", 60.0, "--queued: seconds between reads of its state.")
    flags.DEFINE_string("repo", None, "Git URL of this project, cloned on every worker.")
    flags.DEFINE_string("ref", "main", "Branch or tag to install.")
    flags.DEFINE_string("root", None, "gs:// folder of the workdirs and logs.")
    flags.DEFINE_string("data_clean", None, "GLDv2-clean data folder (first stage).")
    flags.DEFINE_string("data_full", None, "GLDv2 data folder (glr2020 later stages).")
    flags.DEFINE_string("data_x", None, "GLDv2x data folder (glr2021 steps 2-3).")
    flags.DEFINE_string("backbone_weights", None, "keras_import output of the backbone.")
    flags.DEFINE_string("retrieval_solution", "", "The retrieval solution CSV evaluate scores.")
    flags.DEFINE_string(
        "recognition_solution", "", "The recognition solution CSV evaluate scores (GAP)."
    )
    flags.DEFINE_multi_string(
        "member", [], "NAME=WORKDIR of an ensemble member (glr2020; configs/glr2020_ensemble.py)."
    )
    flags.DEFINE_bool("dry_run", False, "Check and print every command; run nothing.")
    flags.DEFINE_integer("max_attempts", 3, "Tries of each step within one run.")
    for name in ("recipe", "tpu", "zone", "repo", "root", "data_clean", "backbone_weights"):
        flags.mark_flag_as_required(name)


def job_from_flags() -> Job:
    """The Job the flags describe.

    Raises:
      app.UsageError: a data folder the recipe reads is missing, a bad
        --member (or a set of them that is no ensemble variant's), or a
        solution the evaluation would not score.
    """
    recipe = RECIPES[FLAGS.recipe]
    data = {"clean": FLAGS.data_clean, "full": FLAGS.data_full, "x": FLAGS.data_x}
    for key in {s.data for s in recipe.stages}:
        if not data[key]:
            raise app.UsageError(f"--recipe={FLAGS.recipe} reads --data_{key}: set it")
    members = {}
    for entry in FLAGS.member:
        name, sep, workdir = entry.partition("=")
        if not sep or not name or not workdir:
            raise app.UsageError(f"--member={entry!r}: expected NAME=WORKDIR")
        members[name] = workdir
    variant = "released"
    if members:
        if FLAGS.recipe != "glr2020":
            raise app.UsageError(
                f"--member: ensembles are GLR2020's ({ENSEMBLE_CONFIG}); "
                f"--recipe={FLAGS.recipe} evaluates its last stage"
            )
        if FLAGS.recognition_solution:
            raise app.UsageError(
                f"--recognition_solution with --member: {ENSEMBLE_CONFIG} evaluates retrieval "
                "only (eval.train_split=''), so it would not be scored"
            )
        try:
            variant = ensemble_variant(members)
        except ValueError as e:
            raise app.UsageError(str(e)) from None
    num_hosts(FLAGS.accelerator_type)  # a bad type fails now
    return Job(
        recipe=FLAGS.recipe,
        tpu=FLAGS.tpu,
        zone=FLAGS.zone,
        accelerator_type=FLAGS.accelerator_type,
        root=FLAGS.root,
        data={k: v for k, v in data.items() if v},
        backbone_weights=FLAGS.backbone_weights,
        repo=FLAGS.repo,
        ref=FLAGS.ref,
        version=FLAGS.version,
        spot=FLAGS.spot,
        queued=FLAGS.queued,
        retrieval_solution=FLAGS.retrieval_solution,
        recognition_solution=FLAGS.recognition_solution,
        members=members,
        ensemble_variant=variant,
    )


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    job = job_from_flags()
    try:
        check_commands(job)  # before any TPU time is spent, as --dry_run
    except ValueError as e:
        sys.exit(f"error: {e}")  # the message alone: the flags were fine
    if FLAGS.dry_run:
        print(shlex.join(create_command(job)))
        for _, command in steps(job):
            print(shlex.join(command))
        return
    run_job(
        job,
        max_attempts=FLAGS.max_attempts,
        queued_timeout_s=FLAGS.queued_timeout_hours * 3600.0,
        poll_seconds=FLAGS.poll_seconds,
    )


if __name__ == "__main__":
    define_flags()
    app.run(main)
