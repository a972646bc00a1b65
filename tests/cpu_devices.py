"""The emulated CPU devices of the tests, in this process and in subprocesses.

XLA's CPU backend optimisation is off in the tests: they run a few steps of
many small programs, so compiling dominates, and level 0 compiles them
faster (measured on a trainer test, 2 cores: 27% less CPU time, 15% less
wall time). Every test compares runs made under the same flags, or
compares with numpy within float tolerance.
"""

import os

OPTIMIZATION_FLAGS = "--xla_backend_optimization_level=0"


def xla_flags(devices: int) -> str:
    """XLA_FLAGS for `devices` emulated CPU devices."""
    return f"{OPTIMIZATION_FLAGS} --xla_force_host_platform_device_count={devices}"


def subprocess_env(devices: int, **extra: str) -> dict[str, str]:
    """The environment of a program the tests start, on `devices` CPU devices."""
    return {**os.environ, "XLA_FLAGS": xla_flags(devices), "JAX_PLATFORMS": "cpu", **extra}
