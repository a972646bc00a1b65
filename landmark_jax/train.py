r"""Trains a retrieval model: a thin entry point around trainer.train_and_evaluate.

    python -m landmark_jax.train --config=configs/NAME.py[:ARG] --workdir=DIR \
        [--config.KEY=VALUE ...]

Multi-host (Cloud TPU VM pods, or any cluster): pass --coordinator_address,
--num_processes and --process_id, or --tpu_pod on a TPU VM pod where JAX
finds them itself (multihost.py). Without these flags it runs as a single
process.

Exit status: 0 when the run has reached config.total_steps (or had already);
75 (preemption.PREEMPTED_EXIT_STATUS) when a preemption notice (SIGTERM)
made it save a checkpoint and stop early: run the same command again to
resume; 1 on an error.
"""

from __future__ import annotations

import sys

from absl import flags, logging
from ml_collections import config_flags

from landmark_jax.runtime import entry_point_errors, program_start
from landmark_jax.training import preemption

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Training config file (configs/NAME.py[:ARG]).")
flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and config.json go.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    program_start.start(argv)
    import jax

    from landmark_jax import trainer

    logging.info(
        "JAX process %d/%d, %d devices",
        jax.process_index(),
        jax.process_count(),
        jax.device_count(),
    )
    try:
        trainer.train_and_evaluate(FLAGS.config, FLAGS.workdir)
    except preemption.Preempted as stopped:
        logging.warning("%s", stopped)
        sys.exit(preemption.PREEMPTED_EXIT_STATUS)


if __name__ == "__main__":
    entry_point_errors.run(main)
