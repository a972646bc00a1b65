"""Where the suite's time goes: `LANDMARK_JAX_COMPILE_LOG=FILE make test`.

conftest.py imports this module's fixture and hook when the variable is set.
Each process of the run appends JSON lines to FILE:

- one per test: its worker, start, wall time, CPU time (its own process's
  and its finished subprocesses'), the seconds this process spent tracing,
  lowering and compiling XLA programs (a persistent-cache hit counts its
  lookup only), those seconds by program name, and each program compiled
  (not found in the persistent cache) with its cache key and compile time;
- one per module- or session-scoped fixture set up: the same times.

A key compiled in more than one test names a program the cache did not
share (two workers compiling it at once, or a program that differs in
something the test does not need).
"""

from __future__ import annotations

import json
import logging
import os
import resource
import time

import jax
import pytest

_COMPILE_EVENTS = (
    "/jax/core/compile/jaxpr_trace_duration",
    "/jax/core/compile/jaxpr_to_mlir_module_duration",
    "/jax/core/compile/backend_compile_duration",
)
_seconds = {"total": 0.0, "programs": 0}
_by_name: dict[str, float] = {}
_compiled: list[tuple[str | None, str, float]] = []
_last_miss: list[str | None] = [None]


def _on_event(event: str, duration: float, **kwargs) -> None:
    if event not in _COMPILE_EVENTS:
        return
    name = kwargs.get("fun_name", "?")
    _seconds["total"] += duration
    _by_name[name] = _by_name.get(name, 0.0) + duration
    if event == _COMPILE_EVENTS[-1]:
        _seconds["programs"] += 1
        _compiled.append((_last_miss[0], name, round(duration, 2)))
        _last_miss[0] = None


class _CacheMisses(logging.Handler):
    """Keeps the key of the last persistent-cache miss (JAX logs it at DEBUG)."""

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if "CACHE MISS" in message:
            _last_miss[0] = message.split("with key ")[-1].strip("'")


jax.monitoring.register_event_duration_secs_listener(_on_event)
_compiler_logger = logging.getLogger("jax._src.compiler")
_compiler_logger.setLevel(logging.DEBUG)
_compiler_logger.addHandler(_CacheMisses())


def _cpu(who: int) -> float:
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def _measure():
    """Starts a measurement; calling the result returns what it measured."""
    start, seconds = time.time(), dict(_seconds)
    own, children = _cpu(resource.RUSAGE_SELF), _cpu(resource.RUSAGE_CHILDREN)

    def finish() -> dict:
        return {
            "worker": os.environ.get("PYTEST_XDIST_WORKER", "master"),
            "start": round(start, 2),
            "wall": round(time.time() - start, 2),
            "cpu": round(_cpu(resource.RUSAGE_SELF) - own, 2),
            "child_cpu": round(_cpu(resource.RUSAGE_CHILDREN) - children, 2),
            "compile": round(_seconds["total"] - seconds["total"], 2),
            "programs": _seconds["programs"] - seconds["programs"],
        }

    return finish


def _write(record: dict) -> None:
    with open(os.environ["LANDMARK_JAX_COMPILE_LOG"], "a") as log:
        log.write(json.dumps(record) + "\n")


@pytest.fixture(autouse=True)
def _log_compile_time(request):
    finish = _measure()
    _by_name.clear()
    _compiled.clear()
    yield
    record = {"test": request.node.nodeid, **finish()}
    record["by_name"] = {k: round(v, 2) for k, v in _by_name.items() if v >= 0.05}
    record["compiled"] = list(_compiled)
    _write(record)


@pytest.hookimpl(hookwrapper=True)
def pytest_fixture_setup(fixturedef, request):
    if fixturedef.scope == "function":
        yield
        return
    finish = _measure()
    yield
    _write({"fixture": f"{fixturedef.argname} ({fixturedef.scope})", **finish()})
