"""The emulated CPU devices of the tests, in this process and in subprocesses.

The tests run a few steps of many small programs, so compiling dominates,
and two XLA flags make the CPU compiler faster: backend optimisation level 0
(measured on a trainer test, 2 cores: 27% less CPU time, 15% less wall
time) and the older elemental emitters instead of the MLIR fusion emitters
(`xla_cpu_use_fusion_emitters=false`: a train step of efficientnet_tiny
compiles in 4.6-5.2 s instead of 9.6-10.4 s). Every test compares runs made
under the same flags, or compares with numpy within float tolerance.
"""

import functools
import glob
import importlib.util
import mmap
import os

FAST_COMPILE_FLAGS = ("--xla_backend_optimization_level=0", "--xla_cpu_use_fusion_emitters=false")


@functools.cache
def _known_to_xla(flag: str) -> bool:
    """Whether this jaxlib's XLA has the flag: XLA aborts on an unknown one,
    and a jaxlib in the supported range may have dropped it."""
    name = flag.lstrip("-").split("=")[0].encode()
    folder = os.path.dirname(importlib.util.find_spec("jaxlib").origin)
    for path in glob.glob(os.path.join(folder, "**", "*.so"), recursive=True):
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            if data.find(name) >= 0:
                return True
    return False


def xla_flags(devices: int) -> str:
    """XLA_FLAGS for `devices` emulated CPU devices."""
    flags = [flag for flag in FAST_COMPILE_FLAGS if _known_to_xla(flag)]
    return " ".join([*flags, f"--xla_force_host_platform_device_count={devices}"])


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

    from configs_for_tests import REPO

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
