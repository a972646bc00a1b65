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
        self._checks = 0  # ids reported to JAX's preemption sync point
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

    def _agreed(self) -> bool:
        """JAX's preemption sync point, counted in checks rather than steps.

        Its protocol takes the largest id any process has reported, plus
        one, as the point where all of them stop; so every process must ask
        at every id in the same order. Training steps and validation batches
        are asked about in the same sequence on every process (they are
        collective computations), so one counter over both serves.
        """
        self._checks += 1
        return bool(self._manager.reached_preemption(self._checks))

    def received(self) -> bool:
        """True once a notice has arrived, checked at each batch of a
        validation pass, which must not outlast the notice (a GLDv2 pass
        takes minutes; a spot VM gives 30 s)."""
        if jax.process_count() > 1:
            return self._agreed()
        return self._own_handler and self._received.is_set()

    def reached(self, step: int) -> bool:
        """True once a notice has arrived: stop after saving `step`."""
        del step  # across processes the checks are counted (see _agreed)
        if jax.process_count() > 1:
            return self._agreed()
        return self._received.is_set()
