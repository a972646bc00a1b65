"""Preemption notices: the trainer saves and stops when the machine is going away.

Cloud TPU VMs, spot VMs and Colab send SIGTERM some seconds before they stop
a job. Across several processes JAX's coordination service turns that signal
into a step at which every process agrees to stop (Orbax's
`reached_preemption`, available once `jax.distributed` is initialised). A
single process has no coordination service, so `PreemptionNotice` catches
SIGTERM itself and reports it at the next step.

The trainer then saves a checkpoint at that step, waits for it, and raises
`Preempted`; `python -m landmark_jax.train` exits with PREEMPTED_EXIT_STATUS
(75, EX_TEMPFAIL: "try again"), so a job runner can tell a preempted run,
to be relaunched on the same workdir, from a finished one (0) or a failed one
(1).
"""

from __future__ import annotations

import signal
import threading
from typing import Any

import jax

# sysexits.h EX_TEMPFAIL: a temporary failure; running the command again
# (it resumes from the saved checkpoint) is the remedy.
PREEMPTED_EXIT_STATUS = 75


class Preempted(Exception):
    """The run saved a checkpoint at `step` on a preemption notice and stopped."""

    def __init__(self, step: int, workdir: str):
        super().__init__(
            f"preempted at step {step}: checkpoint saved in {workdir}; run the same command "
            "again to resume"
        )
        self.step = step
        self.workdir = workdir


class Abandoned(Exception):
    """A validation pass stopped part-way by a preemption notice."""


class PreemptionNotice:
    """Whether a preemption notice has arrived, checked once per step.

    Use as a context manager around the training loop: on one process it
    installs a SIGTERM handler for its duration (and restores the previous
    one after); across processes it asks the checkpoint manager, whose
    answer every process shares.
    """

    def __init__(self, manager: Any):
        """Args: manager: the run's orbax CheckpointManager."""
        self._manager = manager
        self._received = threading.Event()
        self._previous: Any = None
        # signal.signal works only in the main thread; elsewhere (a test
        # runner's worker thread) SIGTERM keeps its default meaning.
        self._own_handler = (
            jax.process_count() == 1 and threading.current_thread() is threading.main_thread()
        )

    def __enter__(self) -> PreemptionNotice:
        if self._own_handler:
            self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        return self

    def __exit__(self, *exc_info) -> None:
        if self._own_handler:
            signal.signal(signal.SIGTERM, self._previous)

    def _on_sigterm(self, signum, frame) -> None:
        del signum, frame  # only the fact matters; the loop acts on it
        self._received.set()

    def received(self) -> bool:
        """True once SIGTERM arrived on a single process: checked inside a
        validation pass, which must not outlast the notice. Across processes
        it stays False: they may stop only at a step they agree on, so a
        validation pass runs to its end there."""
        return self._own_handler and self._received.is_set()

    def reached(self, step: int) -> bool:
        """True once a notice has arrived: stop after saving `step`."""
        if jax.process_count() > 1:
            return bool(self._manager.reached_preemption(step))
        return self._received.is_set()
