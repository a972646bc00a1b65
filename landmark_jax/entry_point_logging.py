"""Log setup shared by the command-line entry points (train, evaluate)."""

from __future__ import annotations

import logging
import os

from absl import logging as absl_logging


class _DropOrbaxInfo(logging.Filter):
    """Orbax logs every save step by step at INFO; keep its warnings only."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or "/orbax/" not in record.pathname


def quiet_library_logs() -> None:
    """Keeps the console to our progress lines: TF's C++ INFO logs and Orbax's
    per-save INFO lines are dropped; warnings and errors still show."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    absl_logging.get_absl_handler().addFilter(_DropOrbaxInfo())
