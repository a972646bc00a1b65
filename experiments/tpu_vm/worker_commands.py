"""What experiments/tpu_vm/tpu_job.py runs on the TPU VM's workers.

The install script (clone, uv venv, `pip install -e .` and JAX for TPUs),
each program's argv (train_argv for a stage, evaluate_argv for the
evaluation; program_commands all of them in order), its log kept in the
bucket (_logged), and steps: the job's worker steps as gcloud ssh commands.
"""

from __future__ import annotations

import shlex
from collections.abc import Sequence

from gcloud_commands import on_all_workers
from recipes import ENSEMBLE_CONFIG, RECIPES, Job, num_hosts

SOURCE_DIR = "landmark_jax_src"  # the clone on every worker, in the home folder
# JAX for TPUs within the project's range (setup.py).
JAX_TPU = "jax[tpu]>=0.10.0,<0.13"
# The TPU VM images' Python is older than the project's (Ubuntu 22.04: 3.10),
# so the install makes a Python 3.12 venv in the clone with uv, as `make`
# makes .venv; the programs run with its interpreter (from the clone).
PYTHON_VERSION = "3.12"
PYTHON = ".venv/bin/python"


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
