r"""Trains a retrieval model: a thin entry point around trainer.train_and_evaluate.

    python -m landmark_jax.train --config=configs/NAME.py[:ARG] --workdir=DIR \
        [--config.KEY=VALUE ...]

Multi-host (Cloud TPU VM pods, or any cluster): pass --coordinator_address,
--num_processes and --process_id, or --tpu_pod on a TPU VM pod where JAX
finds them itself. Without these flags it runs as a single process.
"""

from __future__ import annotations

from absl import app, flags, logging
from ml_collections import config_flags

from landmark_jax import entry_point_logging, tensorflow_setup

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Training config file (configs/NAME.py[:ARG]).")
flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and config.json go.")
flags.DEFINE_string("coordinator_address", None, "HOST:PORT of process 0 (multi-host).")
flags.DEFINE_integer("num_processes", None, "Number of processes (multi-host).")
flags.DEFINE_integer("process_id", None, "This process's index (multi-host).")
flags.DEFINE_bool("tpu_pod", False, "On a Cloud TPU VM pod: let JAX discover the processes.")
flags.mark_flags_as_required(["config", "workdir"])


def initialize_distributed() -> None:
    """Calls jax.distributed.initialize only when asked to.

    With no arguments it fails off a cluster, so it runs only with the
    explicit flags or --tpu_pod.
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


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    entry_point_logging.quiet_library_logs()
    tensorflow_setup.hide_accelerators()  # tf.data runs on the host; JAX owns them
    initialize_distributed()
    import jax

    from landmark_jax import trainer

    logging.info(
        "JAX process %d/%d, %d devices",
        jax.process_index(),
        jax.process_count(),
        jax.device_count(),
    )
    trainer.train_and_evaluate(FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
    app.run(main)
