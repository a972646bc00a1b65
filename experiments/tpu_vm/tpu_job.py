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
(config_lib.validate_config for training, eval_config.validate_eval_config for the
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

import shlex
import sys
import time
from collections.abc import Callable, Sequence

from absl import app, flags, logging
from gcloud_commands import Runner, _run, _said, create_command, delete_command, state_command
from program_checks import check_commands, ensemble_variant
from queued_resources import _ensure_queued
from recipes import ENSEMBLE_CONFIG, RECIPES, Job, num_hosts
from worker_commands import steps

# --- The job -----------------------------------------------------------------------


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
