"""The queued resource of experiments/tpu_vm/tpu_job.py (its `--queued`).

Its states (QUEUED_WAITING, QUEUED_ENDING, QUEUED_DEAD, NOT_FOUND), reading
the current one (queued_state), and making it ACTIVE: created, deleted and
queued again, or waited on, with progress lines (_ensure_queued, _duration).
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Callable

from absl import logging
from gcloud_commands import (
    Runner,
    _said,
    create_command,
    delete_command,
    queued_describe_command,
)
from recipes import Job

# Queued resource states (the Cloud TPU API's QueuedResourceState.State).
# Waited on until ACTIVE: the request is being admitted, queued or provisioned.
QUEUED_WAITING = ("CREATING", "ACCEPTED", "WAITING_FOR_RESOURCES", "PROVISIONING")
# Waited out, then acted on: SUSPENDING ends SUSPENDED, DELETING ends gone.
QUEUED_ENDING = ("SUSPENDING", "DELETING")
# Deleted and queued again: a preempted spot request (node gone), or a failed one.
QUEUED_DEAD = ("SUSPENDED", "FAILED")
NOT_FOUND = "NOT_FOUND"  # no such queued resource (gcloud's error code)
PROGRESS_EVERY_S = 600.0  # a progress line at least this often while waiting


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
