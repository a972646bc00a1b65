r"""Evaluates a trained workdir: a thin entry point around retrieval.evaluation.

    python -m landmark_jax.evaluate --config=configs/NAME.py[:ARG] --workdir=DIR \
        [--config.eval.retrieval_solution=CSV] [--config.eval.recognition_solution=CSV]

The model is rebuilt from DIR/config.json (its input convention included);
the command line contributes `data_dir` and `eval.*`, and a
`--config.model.*` flag that disagrees with DIR/config.json is an error.
Embeds the `index` and `test` splits of config.data_dir (and `train` only
when recognition is scored or written: eval.recognition_solution or
eval.recognition_submission), searches k=100 neighbours, and writes
DIR/eval/metrics.json (`map@100`, and `gap` with a recognition solution),
retrieval_submission.csv, recognition_submission.csv (when recognition runs)
and gallery.png. An ensemble is configured in config.eval.ensemble.

Multi-host: the same flags as train.py (--coordinator_address,
--num_processes, --process_id, or --tpu_pod); every process takes part in
extraction and process 0 writes the files.
"""

from __future__ import annotations

from absl import flags
from ml_collections import config_flags

from landmark_jax.runtime import entry_point_errors, file_io, program_start

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "The workdir's config (configs/NAME.py[:ARG]).")
flags.DEFINE_string("workdir", None, "The training workdir to evaluate.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    program_start.start(argv)  # every process of a pod extracts its share
    import jax

    from landmark_jax.retrieval import evaluation

    # Only model keys typed on the command line are checked against the
    # workdir's config.json; the config file's own model block is ignored.
    overrides = config_flags.get_override_values(FLAGS["config"])
    model_overrides = {k: v for k, v in overrides.items() if k.startswith("model.")}
    metrics = evaluation.evaluate(FLAGS.config, FLAGS.workdir, model_overrides)
    if jax.process_index() == 0:
        print(evaluation.format_metrics(metrics))
        print(f"wrote {file_io.join(FLAGS.workdir, evaluation.EVAL_DIR)}/")


if __name__ == "__main__":
    entry_point_errors.run(main)
