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


def run_processes(cmd: list[str], num_processes: int, devices_per_process: int) -> list[str]:
    """Runs `cmd` as one JAX program of `num_processes` processes on this machine.

    Each process gets `devices_per_process` CPU devices and the multi-host
    flags (a free loopback port as the coordinator); the call waits for all
    and checks that each exited 0.

    Returns:
      Each process's output (stdout and stderr), by process id.
    """
    import socket
    import subprocess

    from config_files import REPO

    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    flags = [f"--coordinator_address=localhost:{port}", f"--num_processes={num_processes}"]
    procs = [
        subprocess.Popen(
            [*cmd, *flags, f"--process_id={i}"],
            cwd=REPO,
            env=subprocess_env(devices_per_process),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(num_processes)
    ]
    outputs = [p.communicate(timeout=400)[0] for p in procs]
    for p, out in zip(procs, outputs, strict=True):
        assert p.returncode == 0, out[-3000:]
    return outputs
