r"""Revisited Oxford and Paris (ROxford5k, RParis6k) as a TensorFlow Datasets builder.

    python -m data_pipelines.build_dataset --dataset=revisited_oxford_paris/roxford5k \
        --manual_dir=data/test/roxford5k --data_dir=gs://BUCKET/tfds
    # or TFDS's own command
    tfds build revisited_oxford_paris/roxford5k --imports=data_pipelines.revisited_builder \
        --manual_dir=data/test/roxford5k --data_dir=gs://BUCKET/tfds

The manual dir is the folder of one set as cirtorch lays it out
(`data/test/roxford5k/`): the ground truth pickle (gnd_roxford5k.pkl,
gnd_rparis6k.pkl) beside `jpg/<name>.jpg` for every image it lists.

Configs (BUILDER_CONFIGS): `roxford5k` and `rparis6k`, the protocol (queries
cropped to their box), and `roxford5k_full_queries` / `rparis6k_full_queries`
with the full query images, only to reproduce papers that evaluated so.

Splits: `revisited_db`, the database images (the pickle's `imlist`), and
`revisited_query`, the queries (`qimlist`), each cropped to its `bbx` as
revisited_images describes. Both are written unshuffled, in gnd order, so row
i of a split read in order is imlist[i] (qimlist[i]). Features: `image`
(JPEG) and `id` (the image name, no extension); no labels: relevance is the
ground truth's.

The ground truth travels in the build's metadata (`metadata.json`, key
`gnd`): imlist, qimlist and per query bbx, easy, hard and junk, as
revisited_gnd.parse_revisited_gnd returns them; landmark_jax.retrieval.revisited
reads it from there. The metadata also records the whole-pixel box each query
was cropped to and what the build read.

A missing or undecodable image, a repeated name, or a box that is empty
inside its image after rounding and clamping stops the build, naming the file
(and the query). Images are encoded by `num_workers` processes (one per core
by default; one for an in-memory ram:// data dir).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import uuid
from collections.abc import Iterator, Sequence
from typing import Any

import tensorflow_datasets as tfds

from data_pipelines import landmark_examples, revisited_images, worker_processes
from data_pipelines.revisited_images import Task
from landmark_jax.data import data_format, revisited_gnd
from landmark_jax.runtime import file_io

DB_SPLIT = "revisited_db"
QUERY_SPLIT = "revisited_query"
IMAGES_DIR = "jpg"


@dataclasses.dataclass
class RevisitedConfig(tfds.core.BuilderConfig):
    """What a Revisited build holds.

    Attributes:
      gnd_file: the ground truth pickle in the manual dir.
      crop_queries: crop each query to its bbx (the protocol); False keeps
        the full query images.
      jpeg_quality: quality of the query crops and of re-encoded (not RGB
        JPEG) images.
    """

    gnd_file: str = ""
    crop_queries: bool = True
    jpeg_quality: int = 95


def _configs() -> list[RevisitedConfig]:
    configs = []
    for name, title in (("roxford5k", "Revisited Oxford"), ("rparis6k", "Revisited Paris")):
        configs.append(
            RevisitedConfig(
                name=name,
                description=f"{title}: the database, and the queries cropped to their boxes.",
                gnd_file=f"gnd_{name}.pkl",
            )
        )
        configs.append(
            RevisitedConfig(
                name=f"{name}_full_queries",
                description=(
                    f"{title} with the full query images: not the protocol, only to "
                    "reproduce papers that evaluated so."
                ),
                gnd_file=f"gnd_{name}.pkl",
                crop_queries=False,
            )
        )
    return configs


class RevisitedOxfordParis(tfds.core.GeneratorBasedBuilder):
    """Revisited Oxford and Paris (Radenovic et al., CVPR 2018)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First TFDS release of the landmark_jax builder."}
    BUILDER_CONFIGS = _configs()
    HOMEPAGE = "http://cmp.felk.cvut.cz/revisitop/"
    MANUAL_DOWNLOAD_INSTRUCTIONS = """\
    Download a set as cirtorch does (data/test/roxford5k/, data/test/rparis6k/)
    and pass its folder as the manual dir: the ground truth pickle
    (gnd_roxford5k.pkl or gnd_rparis6k.pkl) and jpg/<name>.jpg for each of its
    images.
    """

    def __init__(self, *, num_workers: int | None = None, **kwargs):
        """As tfds.core.GeneratorBasedBuilder, plus a build option.

        Args:
          num_workers: processes encoding images (default: one per core; 1
            for an in-memory ram:// data dir).
          **kwargs: tfds.core.GeneratorBasedBuilder's (data_dir, config, ...).
        """
        super().__init__(**kwargs)
        self._num_workers = num_workers
        self._gnd: dict[str, Any] = {}
        self._raw_dir = ""
        self._num_shards: int | None = None
        self._boxes: dict[str, list[int]] = {}

    @property
    def settings(self) -> RevisitedConfig:
        """The build's config."""
        return self.builder_config

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict(
                {
                    data_format.IMAGE: tfds.features.Image(
                        shape=(None, None, 3), encoding_format="jpeg"
                    ),
                    data_format.ID: tfds.features.Text(),
                }
            ),
            homepage=self.HOMEPAGE,
            metadata=tfds.core.MetadataDict(),
            # gnd order: the easy/hard/junk indices are row numbers of the
            # database split read in order.
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        try:
            raw = self._raw_dir = os.fspath(dl_manager.manual_dir)
        except AssertionError as e:
            # TFDS reports a missing or empty manual dir as an AssertionError,
            # which reads as a bug; it is the user's input.
            raise FileNotFoundError(f"{e} (--manual_dir)") from None
        cfg = self.settings
        gnd_path = file_io.join(raw, cfg.gnd_file)
        if not file_io.exists(gnd_path):
            found = sorted(file_io.listdir(raw))[:10] if file_io.isdir(raw) else []
            raise FileNotFoundError(
                f"{gnd_path} not found: the manual dir of config {cfg.name!r} must hold "
                f"{cfg.gnd_file} and {IMAGES_DIR}/ (found {found})"
            )
        gnd = self._gnd = revisited_gnd.read_revisited_gnd(gnd_path)
        imlist, qimlist = gnd["imlist"], gnd["qimlist"]
        if not imlist or not qimlist:
            raise ValueError(
                f"{gnd_path}: {len(imlist)} database and {len(qimlist)} query images; need both"
            )
        # TFDS writes every split in num_shards files and finds a split too
        # small only after encoding it, with an AssertionError naming neither.
        if self._num_shards and len(qimlist) < self._num_shards:
            raise ValueError(
                f"num_shards={self._num_shards}: more shards than examples (split "
                f"{QUERY_SPLIT!r} has {len(qimlist)}, {DB_SPLIT!r} {len(imlist)}); TFDS "
                "writes every split in num_shards files: pass a smaller --num_shards, or "
                "none to let TFDS size the shards"
            )
        images = file_io.join(raw, IMAGES_DIR)
        # Checked before any image is encoded: a 5,000-image build should not
        # fail at its last file for a name the first glance could have caught.
        _check_names(gnd_path, "imlist", imlist, images)
        _check_names(gnd_path, "qimlist", qimlist, images)
        database = [Task(n, revisited_images.image_path(images, n)) for n in imlist]
        queries = []
        for q, name in enumerate(qimlist):
            path = revisited_images.image_path(images, name)
            bbx = tuple(gnd["gnd"][q]["bbx"]) if cfg.crop_queries else None
            queries.append(Task(name, path, bbx, f"{gnd_path}: query {q} ({name!r}, {path})"))
        return {
            DB_SPLIT: self._generate_examples(database),
            QUERY_SPLIT: self._generate_examples(queries),
        }

    def _generate_examples(self, tasks: Sequence[Task]) -> Iterator[tuple[str, dict]]:
        """Encodes the images in worker processes, yielding them in gnd order."""
        encode = functools.partial(revisited_images.encode, jpeg_quality=self.settings.jpeg_quality)
        yield from self._examples(
            worker_processes.map_in_order(
                encode,
                tasks,
                num_workers=self._num_workers,
                data_dir=os.fspath(self.data_dir),
                manual_dir=self._raw_dir,
            )
        )

    def _examples(self, results) -> Iterator[tuple[str, dict]]:
        for name, jpeg, box in results:
            if box is not None:
                self._boxes[name] = list(box)
            yield name, {data_format.IMAGE: jpeg, data_format.ID: name}

    def _download_and_prepare(self, dl_manager, download_config):  # noqa: D102 (TFDS's hook)
        self._num_shards = download_config.num_shards
        super()._download_and_prepare(dl_manager, download_config)
        gnd, cfg = self._gnd, self.settings
        for split, names in ((DB_SPLIT, gnd["imlist"]), (QUERY_SPLIT, gnd["qimlist"])):
            recorded = self.info.splits[split].num_examples
            if recorded != len(names):
                raise AssertionError(
                    f"split {split!r}: wrote {recorded} examples, expected {len(names)}"
                )
        self.info.metadata.update(
            {
                data_format.REVISITED_GND: gnd,
                data_format.BUILD_ID: uuid.uuid4().hex,
                # [left, upper, right, lower] per query, in qimlist order: what
                # the bbx became after rounding and clamping (empty: full images).
                "query_boxes": [self._boxes[n] for n in gnd["qimlist"]] if cfg.crop_queries else [],
                "source": {
                    "manual_dir": landmark_examples.describe_path(self._raw_dir),
                    "gnd_file": cfg.gnd_file,
                    "crop_queries": cfg.crop_queries,
                    "jpeg_quality": cfg.jpeg_quality,
                },
            }
        )


def _check_names(gnd_path: str, key: str, names: Sequence[str], images_dir: str) -> None:
    """Every name is unique and non-empty and has a file.

    Raises:
      ValueError: an empty or repeated name (naming the pickle).
      FileNotFoundError: names without a file (how many, and the first's path).
    """
    seen: set[str] = set()
    for i, name in enumerate(names):
        if not name:
            raise ValueError(f"{gnd_path}: {key}[{i}] is {name!r}, expected an image name")
        if name in seen:
            raise ValueError(f"{gnd_path}: {key} lists {name!r} twice")
        seen.add(name)
    missing = [n for n in names if not file_io.isfile(revisited_images.image_path(images_dir, n))]
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} image(s) of {key} in {gnd_path} have no file, e.g. "
            f"{revisited_images.image_path(images_dir, missing[0])}"
        )
