"""The multi-host flags the entry points share, and jax.distributed setup.

    --coordinator_address=HOST:PORT --num_processes=N --process_id=I
    --tpu_pod          (on a Cloud TPU VM pod, where JAX finds them itself)

Without them a run is a single process. `jax.distributed.initialize()` with
no arguments fails off a cluster, so it is called only when asked for.
Importing this module defines the flags (once per program).
"""

from __future__ import annotations

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("coordinator_address", None, "HOST:PORT of process 0 (multi-host).")
flags.DEFINE_integer("num_processes", None, "Number of processes (multi-host).")
flags.DEFINE_integer("process_id", None, "This process's index (multi-host).")
flags.DEFINE_bool("tpu_pod", False, "On a Cloud TPU VM pod: let JAX discover the processes.")


def initialize_distributed() -> None:
    """Calls jax.distributed.initialize when the flags ask for several processes.

    Raises:
      app.UsageError: only some of --coordinator_address, --num_processes
        and --process_id are given.
    """
    import jax

    explicit = (FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    if any(v is not None for v in explicit):
        if any(v is None for v in explicit):
            raise app.UsageError(
                "--coordinator_address, --num_processes and --process_id go together"
            )
        jax.distributed.initialize(
            coordinator_address=FLAGS.coordinator_address,
            num_processes=FLAGS.num_processes,
            process_id=FLAGS.process_id,
        )
    elif FLAGS.tpu_pod:
        jax.distributed.initialize()
