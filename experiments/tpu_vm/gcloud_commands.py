"""The gcloud commands of experiments/tpu_vm/tpu_job.py, and running one.

The TPU VM's (or queued resource's) creation, state, description and
deletion, a script run on every worker (on_all_workers), and the runner the
job runs them with (_run; Runner its type, _said a failed one's message).
"""

from __future__ import annotations

import shlex
import subprocess
from collections.abc import Callable

from absl import logging
from recipes import Job


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


# --- Running one ----------------------------------------------------------------

Runner = Callable[[list[str]], subprocess.CompletedProcess]


def _run(argv: list[str]) -> subprocess.CompletedProcess:
    """Runs a gcloud command: a worker step's output streams to this
    terminal; a describe/create/delete's is captured (the job reads it)."""
    logging.info("$ %s", shlex.join(argv))
    if "ssh" in argv[:5]:
        return subprocess.run(argv, text=True)
    return subprocess.run(argv, text=True, capture_output=True)


def _said(result: subprocess.CompletedProcess) -> str:
    """What a failed gcloud command said (_run captures it), for an error message."""
    return (result.stderr or "").strip() or "see gcloud's output above"
