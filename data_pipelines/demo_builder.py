r"""The demo data set as a TensorFlow Datasets builder: synthetic landmarks in GLDv2's shape.

    tfds build landmark_demo --imports=data_pipelines.demo_builder --data_dir=demo_data/tfds
    # what `make demo` runs: the raw GLDv2-layout tree first (kept beside it)
    python -m data_pipelines.make_demo_dataset --output_dir=demo_data/raw
    python -m data_pipelines.build_dataset --dataset=landmark_demo \
        --manual_dir=demo_data/raw --data_dir=demo_data/tfds

The build reads a GLDv2-layout tree written by `make_demo_dataset` (the
scenes, photos and CSVs are documented there) exactly as the GLDv2 builder
reads the real one: the same features, labels, validation split (10% of each
class's clean images) and metadata, with the index, test and nonlandmark
splits. With no manual dir, or an empty one, the builder generates that tree
itself first, with make_demo_dataset's defaults, under the TFDS download
dir (`<data_dir>/downloads/landmark_demo_raw`), where the ground-truth CSVs
(retrieval_solution.csv, recognition_solution.csv) then are too.
"""

from __future__ import annotations

import os

import tensorflow_datasets as tfds

from data_pipelines import gldv2_builder, make_demo_dataset
from landmark_jax.runtime import file_io


class LandmarkDemo(gldv2_builder.Gldv2):
    """The landmark_jax demo set: procedurally drawn landmarks photographed."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First TFDS release of the demo set."}
    BUILDER_CONFIGS = [
        gldv2_builder.Gldv2Config(
            name="default",
            description="All train images (is_clean marked), 10% val, index, test, nonlandmark.",
            train_images="all",
            val_fraction=0.1,
        )
    ]
    HOMEPAGE = None
    MANUAL_DOWNLOAD_INSTRUCTIONS = """\
    Optional: a folder written by `python -m data_pipelines.make_demo_dataset
    --output_dir=DIR`. Without one the builder writes it into the download dir.
    """

    def raw_dir(self, dl_manager: tfds.download.DownloadManager) -> str:
        """The manual dir when it holds a demo tree, else one generated now."""
        try:
            return os.fspath(dl_manager.manual_dir)
        except AssertionError:  # TFDS: no manual dir given, or an empty one
            pass
        raw = os.fspath(dl_manager.download_dir / "landmark_demo_raw")
        if not file_io.exists(file_io.join(raw, "train.csv")):
            print(
                make_demo_dataset.format_summary(
                    make_demo_dataset.make_demo_dataset(raw, overwrite=True)
                )
            )
        return raw
