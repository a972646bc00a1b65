r"""A recipe's whole chain of stages as one Cloud TPU VM batch job, safe to re-run.

    python experiments/tpu_vm/tpu_job.py --recipe=glr2020 --tpu=lm-b7 --zone=us-central2-b \
        --accelerator_type=v4-32 --spot --repo=https://github.com/OWNER/landmark_jax.git \
        --root=gs://BUCKET/runs --data_clean=gs://BUCKET/tfds/gldv2/clean \
        --data_full=gs://BUCKET/tfds/gldv2/full --backbone_weights=gs://BUCKET/weights/b7 \
        --retrieval_solution=gs://BUCKET/gldv2/retrieval_solution_v2.1.csv [--dry_run]

What it runs, in order (each a `gcloud` command; `--dry_run` prints them all
and runs nothing):

1. Create the TPU VM or pod slice, unless it exists and is READY
   (`gcloud compute tpus tpu-vm create`, or `queued-resources create` with
   `--queued`; `--spot` for spot capacity).
2. Install the project on every worker (`--worker=all`): clone `--repo` at
   `--ref`, `pip install -e .` and JAX for TPUs.
3. Each stage of the recipe on all workers at once, `python -m
   landmark_jax.train` with `--tpu_pod` on a multi-host slice; each stage's
   workdir is `<root>/<recipe>/<stage>`, its `init.checkpoint` the previous
   stage's workdir, the first stage's `init.backbone` the converted ImageNet
   weights; every worker's log goes to `<root>/<recipe>/logs/`.
4. The evaluation of the last stage, or of an ensemble (`--member
   NAME=WORKDIR` for each member of configs/glr2020_ensemble.py).

Re-running the job after a preemption or a failure resumes where it stopped:
a finished stage returns at once (its checkpoint is at total_steps), an
interrupted one resumes from its latest checkpoint, and nothing is redone.
Within one run, a stage that fails is retried up to `--max_attempts` times;
before each retry the TPU's state is read, and a preempted (or deleted) TPU
is deleted, created again and set up again first.

Recipes (RECIPES): glr2020 = configs/glr2020_retrieval.py clean (GLDv2-clean,
512) -> full (GLDv2, 512) -> full640 -> full736 -> notclean; glr2021 =
configs/glr2021_dolg.py step1 (GLDv2-clean, 256) -> step2 (GLDv2x, 448) ->
step3 (768).
"""

from __future__ import annotations

import dataclasses
import re
import shlex
import subprocess
import time
from collections.abc import Callable, Sequence

from absl import app, flags, logging


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
    solution_flag: str  # the eval key the job's solution CSV goes to


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
        solution_flag="retrieval_solution",
    ),
    "glr2021": Recipe(
        stages=(
            Stage("step1", "configs/glr2021_dolg.py:step1", "clean"),
            Stage("step2", "configs/glr2021_dolg.py:step2", "x"),
            Stage("step3", "configs/glr2021_dolg.py:step3", "x"),
        ),
        evaluation="configs/glr2021_dolg.py:step3",
        solution_flag="recognition_solution",
    ),
}
ENSEMBLE_CONFIG = "configs/glr2020_ensemble.py"
SOURCE_DIR = "landmark_jax_src"  # the clone on every worker, in the home folder
# JAX for TPUs within the project's range (setup.py).
JAX_TPU = "jax[tpu]>=0.10.0,<0.13"
# The TPU VM images' Python is older than the project's (Ubuntu 22.04: 3.10),
# so the install makes a Python 3.12 venv in the clone with uv, as `make`
# makes .venv; the programs run with its interpreter (from the clone).
PYTHON_VERSION = "3.12"
PYTHON = ".venv/bin/python"


def num_hosts(accelerator_type: str) -> int:
    """Workers (hosts) of a TPU slice, from its accelerator type.

    v2/v3/v4/v5p types count TensorCores, 8 per host (v4-8: 1 host, v4-32: 4);
    v5litepod/v6e types count chips: up to 8 on one host, else 4 per host.

    Raises:
      ValueError: an accelerator type of another form, named.
    """
    match = re.fullmatch(r"(v2|v3|v4|v5p|v5litepod|v6e)-(\d+)", accelerator_type)
    if not match:
        raise ValueError(
            f"--accelerator_type={accelerator_type!r}: expected e.g. v3-8, v4-32, v5p-16, "
            "v5litepod-8 or v6e-16"
        )
    family, count = match.group(1), int(match.group(2))
    if family in ("v5litepod", "v6e"):
        return 1 if count <= 8 else count // 4
    return max(1, count // 8)


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
    solution: str = ""
    members: dict[str, str] = dataclasses.field(default_factory=dict)

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


def delete_command(job: Job) -> list[str]:
    if job.queued:
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
        argv = [PYTHON, "-m", "landmark_jax.evaluate", f"--config={ENSEMBLE_CONFIG}"]
        argv += [f"--workdir={job.workdir('ensemble')}"]
        argv += [f"--config.eval.ensemble.{n}.workdir={w}" for n, w in job.members.items()]
    else:
        argv = [PYTHON, "-m", "landmark_jax.evaluate", f"--config={recipe.evaluation}"]
        argv += [f"--workdir={job.workdir(last.name)}"]
    argv.append(f"--config.data_dir={job.data[last.data]}")
    if job.solution:
        argv.append(f"--config.eval.{recipe.solution_flag}={job.solution}")
    if num_hosts(job.accelerator_type) > 1:
        argv.append("--tpu_pod")
    return argv


def steps(job: Job) -> list[tuple[str, list[str]]]:
    """The job's worker steps in order: (name, gcloud ssh command)."""
    recipe = RECIPES[job.recipe]
    named = [("install", on_all_workers(job, install_script(job)))]
    for i, stage in enumerate(recipe.stages):
        named.append(
            (stage.name, on_all_workers(job, _logged(job, stage.name, train_argv(job, i))))
        )
    named.append(("evaluate", on_all_workers(job, _logged(job, "evaluate", evaluate_argv(job)))))
    return named


# --- The job -----------------------------------------------------------------------

Runner = Callable[[list[str]], subprocess.CompletedProcess]


def _run(argv: list[str]) -> subprocess.CompletedProcess:
    logging.info("$ %s", shlex.join(argv))
    return subprocess.run(argv, text=True, stdout=subprocess.PIPE)


def _ensure_tpu(job: Job, run: Runner) -> bool:
    """Makes the TPU exist and be READY; True if it was (re)created."""
    state = run(state_command(job))
    current = state.stdout.strip() if state.returncode == 0 else "NOT_FOUND"
    if current == "READY":
        return False
    if current != "NOT_FOUND":
        logging.warning("TPU %s is %s: deleting it and creating it again", job.tpu, current)
        run(delete_command(job))
    if run(create_command(job)).returncode != 0:
        raise RuntimeError(f"could not create TPU {job.tpu} in {job.zone}")
    return True


def _install(job: Job, run: Runner) -> None:
    if run(steps(job)[0][1]).returncode != 0:
        raise RuntimeError(f"installing the project on {job.tpu} failed; see the output above")


def run_job(
    job: Job, run: Runner = _run, max_attempts: int = 3, wait_seconds: float = 60.0
) -> None:
    """Runs every step (see the module docstring), retrying a failed one.

    Args:
      job: what to run.
      run: runs one command (subprocess.run by default; tests pass a fake).
      max_attempts: tries of each stage and of the evaluation.
      wait_seconds: pause before retrying on a TPU that is still READY.

    Raises:
      RuntimeError: the TPU cannot be created or set up, or a step still
        fails after max_attempts tries (named).
    """
    _ensure_tpu(job, run)
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
            if _ensure_tpu(job, run):
                _install(job, run)
            else:
                time.sleep(wait_seconds)


# --- Command line ---------------------------------------------------------------------

FLAGS = flags.FLAGS


def define_flags() -> None:
    flags.DEFINE_enum("recipe", None, sorted(RECIPES), "The recipe whose stages run.")
    flags.DEFINE_string("tpu", None, "TPU VM (node) name.")
    flags.DEFINE_string("zone", None, "Cloud zone, e.g. us-central2-b.")
    flags.DEFINE_string("accelerator_type", "v4-8", "e.g. v3-8, v4-32, v5litepod-16.")
    flags.DEFINE_string("version", "tpu-ubuntu2204-base", "TPU VM software version.")
    flags.DEFINE_bool("spot", False, "Spot capacity (preemptible).")
    flags.DEFINE_bool("queued", False, "Create through a queued resource.")
    flags.DEFINE_string("repo", None, "Git URL of this project, cloned on every worker.")
    flags.DEFINE_string("ref", "main", "Branch or tag to install.")
    flags.DEFINE_string("root", None, "gs:// folder of the workdirs and logs.")
    flags.DEFINE_string("data_clean", None, "GLDv2-clean data folder (first stage).")
    flags.DEFINE_string("data_full", None, "GLDv2 data folder (glr2020 later stages).")
    flags.DEFINE_string("data_x", None, "GLDv2x data folder (glr2021 steps 2-3).")
    flags.DEFINE_string("backbone_weights", None, "keras_import output of the backbone.")
    flags.DEFINE_string("retrieval_solution", "", "glr2020: the solution CSV evaluate scores.")
    flags.DEFINE_string("recognition_solution", "", "glr2021: the solution CSV evaluate scores.")
    flags.DEFINE_multi_string("member", [], "NAME=WORKDIR of an ensemble member (glr2020).")
    flags.DEFINE_bool("dry_run", False, "Print every command; run nothing.")
    flags.DEFINE_integer("max_attempts", 3, "Tries of each step within one run.")
    for name in ("recipe", "tpu", "zone", "repo", "root", "data_clean", "backbone_weights"):
        flags.mark_flag_as_required(name)


def job_from_flags() -> Job:
    """The Job the flags describe.

    Raises:
      app.UsageError: a data folder the recipe reads is missing, or a bad --member.
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
    solution = FLAGS.retrieval_solution if FLAGS.recipe == "glr2020" else FLAGS.recognition_solution
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
        solution=solution,
        members=members,
    )


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    job = job_from_flags()
    if FLAGS.dry_run:
        print(shlex.join(create_command(job)))
        for _, command in steps(job):
            print(shlex.join(command))
        return
    run_job(job, max_attempts=FLAGS.max_attempts)


if __name__ == "__main__":
    define_flags()
    app.run(main)
