"""The start-up the command-line programs share (`landmark_jax.train`, `landmark_jax.evaluate`).

`start(argv)` is the first line of their `main`: it refuses stray arguments,
keeps library logs to warnings, hides the accelerators from TensorFlow and
joins the other processes of a multi-host run. The programs import their
TensorFlow-using modules (the trainer, the evaluation) after it, so that
TensorFlow starts with its C++ logs quietened and without the accelerators.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

from absl import logging as absl_logging

from landmark_jax.runtime import entry_point_errors, multihost, tensorflow_setup


class _DropOrbaxInfo(logging.Filter):
    """Orbax logs every save step by step at INFO; keep its warnings only."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or "/orbax/" not in record.pathname


def quiet_library_logs() -> None:
    """Keeps the console to our progress lines: TF's C++ INFO logs and Orbax's
    per-save INFO lines are dropped; warnings and errors still show."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    absl_logging.get_absl_handler().addFilter(_DropOrbaxInfo())


def start(argv: Sequence[str]) -> None:
    """Prepares a program's process; call it first in `main(argv)`.

    Raises:
      app.UsageError: positional arguments after the program's flags, or
        only some of the multi-host flags (multihost.initialize_distributed).
    """
    entry_point_errors.refuse_arguments(argv)
    quiet_library_logs()
    tensorflow_setup.hide_accelerators()  # tf.data runs on the host; JAX owns them
    # Every process of a pod takes part in the program's work.
    multihost.initialize_distributed()
