r"""Exports a trained run, or an ensemble, as a TF SavedModel: a thin entry point.

    python -m landmark_jax.export --workdir=DIR --output=EXPORT_DIR
    python -m landmark_jax.export --config=configs/glr2020_ensemble.py \
        --config.eval.ensemble.b7_640.workdir=... --output=gs://BUCKET/glr2020_export

The SavedModel's `serving_default` signature is GLR2020's: `input_image`
(uint8 [H, W, 3]) -> {'global_descriptor': float32 [D]}; `serving_batch`
takes uint8 [B, H, W, 3] images of one size. Without --config, the run's own
config.json says how its images are sized (its eval.* block); with one, its
eval.* does, as for `evaluate`. See serving/saved_model.py.
"""

from __future__ import annotations

from absl import flags
from ml_collections import config_flags

from landmark_jax.runtime import entry_point_errors, program_start

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    "config", None, "An evaluation config (configs/NAME.py[:ARG]); default: the workdir's own."
)
flags.DEFINE_string("workdir", None, "The trained run to export (or members in --config).")
flags.DEFINE_string("output", None, "The folder to write the SavedModel to (local or gs://).")
flags.DEFINE_bool("overwrite", False, "Move an existing --output aside instead of refusing.")
flags.DEFINE_integer(
    "descriptor_dim", None, "Refuse unless the descriptor has this many dimensions."
)
flags.mark_flags_as_required(["output"])


def main(argv):
    program_start.start(argv)
    from landmark_jax.serving import saved_model
    from landmark_jax.workdir import run_config

    if FLAGS.config is None and not FLAGS.workdir:
        raise ValueError("give --workdir=DIR, or --config=CONFIG naming ensemble members")
    config = FLAGS.config if FLAGS.config is not None else run_config.read_run_config(FLAGS.workdir)
    info = saved_model.export(
        config,
        FLAGS.workdir,
        FLAGS.output,
        overwrite=FLAGS.overwrite,
        expected_dim=FLAGS.descriptor_dim,
    )
    print(f"exported a {info['descriptor_dim']}-d descriptor of {len(info['members'])} model(s)")
    if "moved_aside" in info:
        print(f"moved the previous export aside to {info['moved_aside']}")
    print(f"wrote {info['output']}/ (SavedModel; jax.export in {saved_model.JAX_DIR}/)")


if __name__ == "__main__":
    entry_point_errors.run(main)
