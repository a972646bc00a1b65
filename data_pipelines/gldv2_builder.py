r"""Google Landmarks v2 as a TensorFlow Datasets builder, from the user's extracted tree.

    python -m data_pipelines.build_dataset --dataset=gldv2/clean \
        --manual_dir=/mnt/gldv2 --data_dir=gs://BUCKET/tfds
    # or TFDS's own command (Beam: see the README)
    tfds build gldv2/clean --imports=data_pipelines.gldv2_builder \
        --manual_dir=/mnt/gldv2 --data_dir=gs://BUCKET/tfds

The manual dir holds GLDv2 as published and as `download_gldv2` extracts it:
train.csv, train_clean.csv, index.csv, test.csv (and optionally
nonlandmark.csv) beside the `train/`, `index/`, `test/` (`nonlandmark/`)
trees of `a/b/c/<id>.jpg`.

Configs (BUILDER_CONFIGS): `full` (GLDv2: every train.csv row, 203,094
classes, `is_clean` from train_clean.csv; with index and test), `clean`
(GLDv2-clean: train_clean.csv's rows, 81,313 classes; train and val only)
and `gldv2x` (every image of the clean classes, GLR2021's set; with index and
test). Train is relabelled to contiguous labels 0..C-1; the `label`
ClassLabel's names are the landmark ids in label order, and `val` holds a
fraction of each class's clean images (landmark_examples.assign_val).

Features: `image` (JPEG bytes: RGB JPEGs byte for byte, other images
re-encoded as 3-channel JPEGs), `id`, `label` (-1 outside train/val),
`landmark_id` (-1 outside train/val), `is_clean`. The builder's metadata
(`metadata.json`) holds what the losses need per class (`class_counts`:
count, num_clean, train_val_count, train_val_clean; see
landmark_jax.data.data_format.read_label_map), the images skipped with
`skip_bad_images`, and what the build read.

EXIF orientation (`exif_orientation`, off by default): TF's JPEG decoder, the
input pipeline's and GLR2020's notebooks', ignores the EXIF Orientation tag;
`cv2.imread`, the reader of GLR2021 (Henkel's data/ch_ds_1.py) and of the
official DOLG code (training and evaluation), applies it. A build made with
`gldv2/clean/exif_orientation=True` (TFDS's name keywords; the build folder
is then `clean_exif`) stores every tagged image upright, once, as cv2 would
have shown it (image_encoding.encode_image), so training and evaluation see
what those recipes saw. Default off: the stored pixels, as GLR2020's TF
decoding saw them, every RGB JPEG byte for byte. How many GLDv2 files carry
a tag other than 1 is not known here.

Nothing is dropped silently: a missing or undecodable image stops the build
with its path, unless `skip_bad_images`, which lists every skipped image in
the metadata. Images are encoded by `num_workers` processes (one per core by
default); with Beam options (TFDS's DownloadConfig.beam_options, `tfds build
--beam_pipeline_options=...`) the encoding runs on Apache Beam instead.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import uuid
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from data_pipelines import gldv2_csv, image_encoding, landmark_examples, worker_processes
from data_pipelines.landmark_examples import Example
from landmark_jax.data import data_format
from landmark_jax.runtime import file_io

# Splits with an id CSV only (no labels), built when the config asks for them
# (index, test) or when their CSV is in the manual dir (nonlandmark: known
# non-landmark photos, the reference set of recognition's penalty).
RETRIEVAL_SPLITS = ("index", "test")
NON_LANDMARK_SPLIT = "nonlandmark"
# Examples per plan file of a Beam build (workers read the plan from files:
# a pipeline graph carrying millions of examples would be too large).
_BEAM_PLAN_CHUNK = 2000


@dataclasses.dataclass
class Gldv2Config(tfds.core.BuilderConfig):
    """What a GLDv2 build holds.

    Attributes:
      train_images: which train.csv rows (landmark_examples.TRAIN_SELECTIONS).
      retrieval_splits: also build index and test.
      val_fraction: fraction of each class's clean images held out as `val`.
      seed: seed of the validation split.
      jpeg_quality: quality of re-encoded (not RGB JPEG) images.
      exif_orientation: store EXIF-oriented images upright (as cv2.imread
        reads them: GLR2021's and DOLG's readers); False: as stored (TF's
        decoding: GLR2020's). See the module docstring.
    """

    train_images: str = "all"
    retrieval_splits: bool = True
    val_fraction: float = 0.02
    seed: int = 0
    jpeg_quality: int = 95
    exif_orientation: bool = False


def landmark_features() -> tfds.features.FeaturesDict:
    """The features of every landmark data set built here (GLDv2, the demo)."""
    return tfds.features.FeaturesDict(
        {
            data_format.IMAGE: tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
            data_format.ID: tfds.features.Text(),
            # Names (the landmark ids in label order) are set by the build.
            data_format.LABEL: tfds.features.ClassLabel(),
            data_format.LANDMARK_ID: tfds.features.Scalar(np.int64),
            data_format.IS_CLEAN: tfds.features.Scalar(np.bool_),
        }
    )


def _set_class_names(label: tfds.features.ClassLabel, names: list[str]) -> None:
    # A builder constructed over an earlier build of the same directory has
    # that build's names; a rebuild (download_mode overwrite) replaces them.
    if label.num_classes is not None and label.names != names:
        label._int2str = label._str2int = label._num_classes = None
    label.names = names


def _beam_encode_chunk(
    path: str, jpeg_quality: int, exif_orientation: bool = False
) -> Iterator[tuple[str, dict]]:
    """A Beam worker: reads one plan file and encodes its images."""
    for line in file_io.read_text(path).splitlines():
        example = Example(**json.loads(line))
        image_id, features, _ = image_encoding.example_features(
            example, jpeg_quality, False, exif_orientation
        )
        yield image_id, features


def _exif_config(config: Any, configs: dict, default: tfds.core.BuilderConfig) -> Gldv2Config:
    """The config (a name, a Gldv2Config or None: the default) with EXIF
    orientation applied, named `<name>_exif` so that its build has a folder of
    its own."""
    if config is None:
        config = default
    elif isinstance(config, str):
        if config not in configs:
            raise ValueError(f"gldv2: no config {config!r}; expected one of {sorted(configs)}")
        config = configs[config]
    if config.exif_orientation:
        return config
    return dataclasses.replace(
        config,
        name=f"{config.name}_exif",
        description=f"{config.description} (EXIF orientation applied)",
        exif_orientation=True,
    )


class Gldv2(tfds.core.GeneratorBasedBuilder):
    """Google Landmarks Dataset v2 (Weyand et al., CVPR 2020)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First TFDS release of the landmark_jax builder."}
    BUILDER_CONFIGS = [
        Gldv2Config(name="full", description="GLDv2: every train.csv image, 203,094 classes."),
        Gldv2Config(
            name="clean",
            description="GLDv2-clean: train_clean.csv's images, 81,313 classes.",
            train_images="clean",
            retrieval_splits=False,
        ),
        Gldv2Config(
            name="gldv2x",
            description="Every image of the 81,313 clean classes (GLR2021).",
            train_images="clean_classes",
        ),
    ]
    HOMEPAGE = "https://github.com/cvdfoundation/google-landmark"
    MANUAL_DOWNLOAD_INSTRUCTIONS = """\
    Download and extract GLDv2 (python -m data_pipelines.download_gldv2) and
    pass its folder as the manual dir: train.csv, train_clean.csv, index.csv,
    test.csv and the train/, index/, test/ trees of a/b/c/<id>.jpg.
    """

    def __init__(
        self,
        *,
        skip_bad_images: bool = False,
        num_workers: int | None = None,
        exif_orientation: bool = False,
        **kwargs,
    ):
        """As tfds.core.GeneratorBasedBuilder, plus three build options.

        Args:
          skip_bad_images: leave out missing and undecodable images, listed in
            the metadata's `skipped_images`, instead of stopping the build.
          num_workers: processes encoding images (default: one per core; 1
            for an in-memory ram:// data dir).
          exif_orientation: build the config's `_exif` variant, its
            EXIF-oriented images stored upright (see the module docstring).
          **kwargs: tfds.core.GeneratorBasedBuilder's (data_dir, config, ...).

        Raises:
          ValueError: exif_orientation with an unknown config name.
        """
        if exif_orientation:
            kwargs["config"] = _exif_config(
                kwargs.get("config"), self.builder_configs, self.default_builder_config
            )
        super().__init__(**kwargs)
        self._skip_bad_images = skip_bad_images
        self._num_workers = num_workers
        self._use_beam = False
        self._num_shards: int | None = None
        self._planned: dict[str, list[Example]] = {}
        self._skipped: list[tuple[str, str, str]] = []
        self._raw_dir = ""
        self._landmark_ids: list[int] = []

    @property
    def settings(self) -> Gldv2Config:
        """The build's config."""
        return self.builder_config

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            features=landmark_features(),
            supervised_keys=(data_format.IMAGE, data_format.LABEL),
            homepage=self.HOMEPAGE,
            metadata=tfds.core.MetadataDict(),
        )

    # ------------------------------------------------------------- planning

    def raw_dir(self, dl_manager: tfds.download.DownloadManager) -> str:
        """The GLDv2-layout folder the build reads (the manual dir).

        Raises:
          FileNotFoundError: no manual dir given, or an empty one.
        """
        try:
            return os.fspath(dl_manager.manual_dir)
        except AssertionError as e:
            # TFDS reports a missing or empty manual dir as an AssertionError,
            # which reads as a bug; it is the user's input.
            raise FileNotFoundError(f"{e} (--manual_dir)") from None

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        raw = self._raw_dir = self.raw_dir(dl_manager)
        cfg = self.settings
        train_csv = gldv2_csv.required(raw, "train.csv")
        # Required by every config: without it `full` would call every image
        # clean, and GLR2020's not-clean loss weight would silently do nothing.
        clean_csv = gldv2_csv.required(raw, "train_clean.csv")
        plan = landmark_examples.plan_split(
            "train",
            train_csv,
            file_io.join(raw, "train"),
            clean_csv=clean_csv,
            train_images=cfg.train_images,
            skip_missing=self._skip_bad_images,
        )
        if not plan.examples:
            raise ValueError(f"{train_csv}: no train images to build (config {cfg.name!r})")
        self._skipped = list(plan.missing)
        is_val = landmark_examples.assign_val(
            plan.examples, cfg.val_fraction, np.random.default_rng(cfg.seed)
        )
        planned = {
            "train": [ex for ex, v in zip(plan.examples, is_val, strict=True) if not v],
            "val": [ex for ex, v in zip(plan.examples, is_val, strict=True) if v],
        }
        id_splits = list(RETRIEVAL_SPLITS) if cfg.retrieval_splits else []
        if gldv2_csv.has_rows(file_io.join(raw, f"{NON_LANDMARK_SPLIT}.csv")):
            id_splits.append(NON_LANDMARK_SPLIT)
        listed = {train_csv: plan.listed}
        for split in id_splits:
            split_csv = gldv2_csv.required(raw, f"{split}.csv")
            split_plan = landmark_examples.plan_split(
                split, split_csv, file_io.join(raw, split), skip_missing=self._skip_bad_images
            )
            self._skipped += split_plan.missing
            planned[split] = split_plan.examples
            listed[split_csv] = split_plan.listed
        gldv2_csv.check_disjoint(listed)
        # TFDS cannot write a split without examples (val with val_fraction 0,
        # an empty nonlandmark.csv).
        self._planned = {k: v for k, v in planned.items() if v}
        _check_num_shards(self._planned, self._num_shards)
        landmark_ids = sorted(plan.label_of, key=plan.label_of.get)
        _set_class_names(self.info.features[data_format.LABEL], [str(i) for i in landmark_ids])
        self._landmark_ids = landmark_ids
        return {
            split: self._generate_examples(split, examples)
            for split, examples in self._planned.items()
        }

    # ------------------------------------------------------------ encoding

    def _generate_examples(self, split: str, examples: Sequence[Example]):
        if self._use_beam:
            return self._beam_examples(split, examples)
        return self._local_examples(examples)

    def _local_examples(self, examples: Sequence[Example]) -> Iterator[tuple[str, dict]]:
        """Encodes the images in worker processes, yielding them in plan order."""
        encode = functools.partial(
            image_encoding.example_features,
            jpeg_quality=self.settings.jpeg_quality,
            skip_bad_images=self._skip_bad_images,
            exif_orientation=self.settings.exif_orientation,
        )
        results = worker_processes.map_in_order(
            encode,
            examples,
            num_workers=self._num_workers,
            data_dir=os.fspath(self.data_dir),
            manual_dir=self._raw_dir,
        )
        yield from self._kept(examples, results)

    def _kept(self, examples, results) -> Iterator[tuple[str, dict]]:
        for example, (image_id, features, reason) in zip(examples, results, strict=True):
            if features is None:
                self._skipped.append((image_id, example.path, reason))
                continue
            yield image_id, features

    def _beam_examples(self, split: str, examples: Sequence[Example]):
        """The encoding as a Beam transform; its workers read the plan from files."""
        beam = tfds.core.lazy_imports.apache_beam
        plan_dir = file_io.join(os.fspath(self.data_dir), f"beam_plan-{split}")
        file_io.makedirs(plan_dir)
        paths = []
        for start in range(0, len(examples), _BEAM_PLAN_CHUNK):
            path = file_io.join(plan_dir, f"{start // _BEAM_PLAN_CHUNK:06d}.jsonl")
            chunk = examples[start : start + _BEAM_PLAN_CHUNK]
            file_io.write_text(path, "\n".join(json.dumps(dataclasses.asdict(e)) for e in chunk))
            paths.append(path)
        return (
            beam.Create(paths)
            | beam.Reshuffle()
            | beam.FlatMap(
                _beam_encode_chunk,
                jpeg_quality=self.settings.jpeg_quality,
                exif_orientation=self.settings.exif_orientation,
            )
        )

    # ----------------------------------------------------------- the build

    def _download_and_prepare(self, dl_manager, download_config):  # noqa: D102 (TFDS's hook)
        self._use_beam = (
            download_config.beam_runner is not None or download_config.beam_options is not None
        )
        self._num_shards = download_config.num_shards
        if self._use_beam and self._skip_bad_images:
            raise ValueError(
                "skip_bad_images is not available with Beam (its workers cannot report "
                "what they skip to the build's class counts); build without Beam options, "
                "or fix the images the Beam build names"
            )
        super()._download_and_prepare(dl_manager, download_config)
        for split in self._planned:
            plan_dir = file_io.join(os.fspath(self.data_dir), f"beam_plan-{split}")
            if file_io.exists(plan_dir):
                file_io.rmtree(plan_dir)
        self._record_metadata()

    def _record_metadata(self) -> None:
        """Per-class counts of what was written, skipped images, and the inputs."""
        skipped = {image_id for image_id, _, _ in self._skipped}
        written = {k: [e for e in v if e.image_id not in skipped] for k, v in self._planned.items()}
        for split, examples in written.items():
            recorded = self.info.splits[split].num_examples
            if recorded != len(examples):
                raise AssertionError(
                    f"split {split!r}: wrote {recorded} examples, expected {len(examples)}"
                )
        num_classes = len(self._landmark_ids)
        train = written["train"]
        count, num_clean = landmark_examples.class_counts(train, num_classes)
        empty = np.flatnonzero(count == 0)
        if empty.size:
            raise ValueError(
                f"{empty.size} landmark(s) lost all their training images to skipped images, "
                f"e.g. landmark_id {self._landmark_ids[empty[0]]}; fix or remove those rows "
                f"of {file_io.join(self._raw_dir, 'train.csv')}"
            )
        # Train + val per class: the counts over every row built, as the
        # GLR2020 notebooks compute n_c (held-out fold included; losses.py).
        train_val, train_val_clean = landmark_examples.class_counts(
            train + written.get("val", []), num_classes
        )
        cfg = self.settings
        self.info.metadata.update(
            {
                data_format.CLASS_COUNTS: {
                    "count": count.tolist(),
                    "num_clean": num_clean.tolist(),
                    "train_val_count": train_val.tolist(),
                    "train_val_clean": train_val_clean.tolist(),
                },
                data_format.SKIPPED_IMAGES: sorted(self._skipped),
                data_format.BUILD_ID: uuid.uuid4().hex,
                "source": {
                    "manual_dir": landmark_examples.describe_path(self._raw_dir),
                    "train_images": cfg.train_images,
                    "val_fraction": cfg.val_fraction,
                    "seed": cfg.seed,
                    "jpeg_quality": cfg.jpeg_quality,
                    # Recorded when on; absent: the pixels as stored (as
                    # every build before the option).
                    **({"exif_orientation": True} if cfg.exif_orientation else {}),
                },
            }
        )


def _check_num_shards(planned: dict[str, Sequence[Example]], num_shards: int | None) -> None:
    """Refuses a fixed shard count larger than a split, before any image is encoded.

    TFDS applies DownloadConfig.num_shards to every split and fails only after
    encoding a split smaller than that, with an AssertionError naming neither.

    Raises:
      ValueError: a split with fewer examples than num_shards, naming it.
    """
    if not num_shards:
        return
    small = {
        split: len(examples) for split, examples in planned.items() if len(examples) < num_shards
    }
    if small:
        listed = ", ".join(f"split {split!r} has {n:,d}" for split, n in small.items())
        raise ValueError(
            f"num_shards={num_shards}: more shards than examples ({listed}); TFDS writes "
            "every split in num_shards files: pass a smaller --num_shards, or none to let "
            "TFDS size the shards"
        )
