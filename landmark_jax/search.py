r"""Search your own photos with a trained model: a thin entry point.

    python -m landmark_jax.search index --index_dir=INDEX \
        --images=FOLDER|GLOB|gs://PREFIX [--images=...] (--workdir=RUN | --saved_model=EXPORT)
    python -m landmark_jax.search index --index_dir=INDEX \
        --data_dir=BUILD --split=train (--workdir=RUN | --saved_model=EXPORT)
    python -m landmark_jax.search query --index_dir=INDEX --images=NEW_PHOTOS \
        --output=OUT [--k=10] [--recognize]

`index` embeds every photo (or a TFDS split) into INDEX, a self-describing
folder: embeddings, ids and paths, the model's identity and the search
settings, every skipped file with its reason. A rerun continues an
interrupted build and adds new files; another model is refused.
`query` embeds new photos with the index's model (or the one given, which
must be the same) and writes OUT/neighbours.csv, neighbours.json and
gallery.png; `--recognize`, on an index of a labelled split (train), answers
a landmark id and confidence per photo in OUT/recognition.csv. The model is
a run (`--workdir`, its config.json's eval.* settings unless `--config`
gives an evaluation config, as `export` takes it) or an export of
`python -m landmark_jax.export` (`--saved_model`). See serving/photo_*.py.
"""

from __future__ import annotations

from absl import app, flags
from ml_collections import config_flags

from landmark_jax.runtime import entry_point_errors, program_start

COMMANDS = ("index", "query")

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    "config", None, "An evaluation config (configs/NAME.py[:ARG]); default: the workdir's own."
)
flags.DEFINE_string("index_dir", None, "The index folder (local or gs://).")
flags.DEFINE_multi_string(
    "images", [], "Photos: a folder, a glob or a gs:// prefix (repeat, or separate by commas)."
)
flags.DEFINE_string("data_dir", None, "index: a TFDS build whose --split to index instead.")
flags.DEFINE_string("split", None, "index: the split of --data_dir (train: for --recognize).")
flags.DEFINE_string(
    "non_landmark_split",
    None,
    "index: a split of known non-landmarks for --recognize's penalty "
    "(default: the run's eval.non_landmark_split for a labelled split; '' for none).",
)
flags.DEFINE_string("workdir", None, "The trained run whose model embeds the photos.")
flags.DEFINE_string("saved_model", None, "An export of landmark_jax.export, instead of a run.")
flags.DEFINE_string("output", None, "query: the folder for the neighbours and the gallery.")
flags.DEFINE_integer("k", None, "query: neighbours per photo (default: the index's eval.k).")
flags.DEFINE_bool("recognize", False, "query: answer a landmark id and confidence per photo.")
flags.DEFINE_integer("gallery_queries", 16, "query: photos shown in gallery.png (0: none).")
flags.DEFINE_multi_string(
    "rerank",
    [],
    "query: a re-ranking step of eval.rerank, e.g. 'alpha_qe(n=2, alpha=3)' (repeat for several, "
    "applied in order; retrieval/rerank.py).",
)
flags.mark_flags_as_required(["index_dir"])


def _model(index_info=None):
    """The model the flags name, else (query) the one the index was built with."""
    from landmark_jax.serving import photo_model

    if FLAGS.saved_model and (FLAGS.workdir or FLAGS.config is not None):
        raise ValueError("give --saved_model or --workdir/--config, not both")
    if FLAGS.saved_model:
        return photo_model.from_saved_model(FLAGS.saved_model)
    if FLAGS.workdir or FLAGS.config is not None:
        return photo_model.from_run(FLAGS.workdir, FLAGS.config)
    if index_info is None:
        raise ValueError("give the model: --workdir=RUN or --saved_model=EXPORT")
    return photo_model.from_record(index_info["model"])


def main(argv):
    if len(argv) < 2 or argv[1] not in COMMANDS:
        raise app.UsageError(f"the first argument is the command: one of {', '.join(COMMANDS)}")
    command = argv[1]
    program_start.start([argv[0], *argv[2:]])  # refuses anything else positional
    from landmark_jax.serving import photo_files, photo_index, photo_search

    if command == "index":
        info = photo_index.build_index(
            FLAGS.index_dir,
            _model(),
            images=FLAGS.images,
            data_dir=FLAGS.data_dir,
            split=FLAGS.split,
            non_landmark_split=FLAGS.non_landmark_split,
        )
        if info["resumed"]:
            print(f"continued: {info['resumed']} photo(s) were already in the index")
        skipped = [photo_files.Skipped(**s) for s in info["skipped"]]
        if skipped:
            print(photo_files.count_skipped(skipped))
        labelled = " (labelled: --recognize can use it)" if info["labelled"] else ""
        print(f"indexed {info['count']} photo(s){labelled}; wrote {FLAGS.index_dir}/")
        return
    if not FLAGS.output:
        raise ValueError("query needs --output=FOLDER for the neighbours and the gallery")
    if not FLAGS.images:
        raise ValueError("query needs --images=FOLDER|GLOB|gs://PREFIX: the photos to search")
    index = photo_index.load_index(FLAGS.index_dir)
    model = _model(index.info)
    k = FLAGS.k or index.info["search"]["k"]
    from landmark_jax.retrieval import rerank

    steps = rerank.parse_steps(FLAGS.rerank)
    result = photo_search.query_photos(
        index,
        model,
        FLAGS.images,
        k,
        recognize=FLAGS.recognize,
        rerank_steps=steps,
    )
    if result.skipped:
        print(photo_files.count_skipped(result.skipped))
    written = photo_search.write_outputs(
        FLAGS.output, index, model, result, gallery_queries=FLAGS.gallery_queries
    )
    reranked = f", re-ranked by {' + '.join(s.label() for s in steps)}" if steps else ""
    print(f"searched {len(result.ids)} photo(s) against {index.info['count']}{reranked}; wrote:")
    for path in written.values():
        print(f"  {path}")


if __name__ == "__main__":
    entry_point_errors.run(main)
