"""A searchable index of photos: a self-describing folder, built once, resumable.

    INDEX_DIR/
      index_info.json   the model's identity (its members, descriptor
                        dimension), the search settings, the sources, the
                        count, and every skipped file with its reason
      parts/part-NNNNN.npz   embeddings as they are computed (ids, paths,
                        float32 [n, D], labels, the part's skipped files)
      embeddings.npz    all parts merged: ids, paths, embeddings, labels
                        (landmark ids; -1 for unlabelled photos)
      non_landmarks.npz the non-landmark split's embeddings (a labelled
                        split's index, for recognition's penalty)
      scann/            a ScaNN index, only at or above knn.MIN_TREE_POINTS
                        rows (below it every backend is brute force)
      eval/             a TFDS split's extraction cache (evaluation's)

Resumable: photos are embedded in parts, each written whole; a rerun skips
every file a part already holds (embedded or skipped) and says how many,
and a rerun with new files adds them. An index is tied to one model: the
identity is written before the first part, and a build or query with
another model (another run, checkpoint, extraction setting or descriptor)
is refused with both named.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import tqdm

from landmark_jax.data import data_format
from landmark_jax.retrieval import evaluation, knn
from landmark_jax.runtime import file_io, sharding
from landmark_jax.serving import photo_files, photo_model

FORMAT = "landmark_jax photo index 1"
INFO_FILE = "index_info.json"
EMBEDDINGS_FILE = "embeddings.npz"
NON_LANDMARKS_FILE = "non_landmarks.npz"
PARTS_DIR = "parts"
SCANN_DIR = "scann"
# Photos per part file (what a crash can cost), and per call of the model
# (how many decoded photos are held at once).
PART_SIZE = 512
EMBED_BATCH = 64


@dataclasses.dataclass(frozen=True)
class PhotoIndex:
    """A loaded index.

    Attributes:
      directory: where it lives.
      info: index_info.json.
      ids: [N] str; paths: [N] str ('' for a TFDS split's images).
      embeddings: [N, D] float32.
      labels: [N] int64 landmark ids (-1: none).
      non_landmarks: [M, D] float32, or None.
    """

    directory: str
    info: dict[str, Any]
    ids: np.ndarray
    paths: np.ndarray
    embeddings: np.ndarray
    labels: np.ndarray
    non_landmarks: np.ndarray | None

    @property
    def labelled(self) -> bool:
        return bool(self.info.get("labelled"))


def check_model(directory: str, info: dict[str, Any], model: photo_model.PhotoModel) -> None:
    """Refuses a model whose descriptors differ from the index's.

    Raises:
      ValueError: the identities differ; both models named.
    """
    recorded = info["model"]
    if photo_model.comparable_identity(recorded["identity"]) == photo_model.comparable_identity(
        model.identity
    ):
        return
    built = photo_model.describe_identity(
        recorded["kind"], recorded["location"], recorded["identity"]
    )
    differences = "; ".join(photo_model.identity_differences(recorded["identity"], model.identity))
    raise ValueError(
        f"the index {directory} was built with {built}, but this command uses "
        f"{model.describe()}: their descriptors differ ({differences}). Use the index's "
        "model, or build another index (another --index_dir) with this one"
    )


def _info_path(directory: str) -> str:
    return file_io.join(directory, INFO_FILE)


def _read_info(directory: str) -> dict[str, Any] | None:
    path = _info_path(directory)
    if not file_io.exists(path):
        return None
    info = file_io.read_json(path)
    if info.get("format") != FORMAT:
        raise ValueError(f"{path} is not a photo index's ({info.get('format')!r} != {FORMAT!r})")
    return info


def _start(directory: str, model: photo_model.PhotoModel, source: dict[str, Any]) -> dict:
    """The index's info, written (or checked against the model) before any part."""
    info = _read_info(directory)
    if info is not None:
        check_model(directory, info, model)
        recorded = info["source"]
        # Photos add to photos; a split's index holds that split alone.
        if ("images" in recorded) != ("images" in source) or (
            "split" in source and recorded != source
        ):
            raise ValueError(
                f"the index {directory} holds {recorded}; it cannot take {source} as well: "
                "build another index (another --index_dir)"
            )
        return info
    file_io.makedirs(directory)
    info = {
        "format": FORMAT,
        "model": model.record(),
        "squared_norm": model.squared_norm,
        "search": model.search,
        "source": source,
        "complete": False,
    }
    file_io.write_json(_info_path(directory), info)
    return info


def _parts(directory: str) -> list[dict[str, np.ndarray]]:
    return [file_io.load_npz(p) for p in file_io.glob(file_io.join(directory, PARTS_DIR, "*.npz"))]


def _write_part(directory: str, number: int, rows: list, skipped: list) -> None:
    ids, paths, embeddings, labels = zip(*rows, strict=True) if rows else ([], [], [], [])
    # A part of skipped files only has no rows, and no dimension.
    embeddings = np.stack(embeddings) if rows else np.zeros((0, 0), np.float32)
    file_io.save_npz(
        file_io.join(directory, PARTS_DIR, f"part-{number:05d}.npz"),
        ids=np.asarray(ids, dtype=str),
        paths=np.asarray(paths, dtype=str),
        embeddings=embeddings.astype(np.float32),
        labels=np.asarray(labels, np.int64),
        skipped=json.dumps([s.as_json() for s in skipped]),
    )


def _embed_parts(
    directory: str,
    model: photo_model.PhotoModel,
    photos: Iterable[photo_files.Photo | photo_files.Skipped],
    total: int,
    first_part: int,
    part_size: int,
) -> None:
    """Embeds photos in batches and writes them in parts of `part_size`."""
    rows: list[tuple] = []
    skipped: list[photo_files.Skipped] = []
    batch: list[photo_files.Photo] = []
    number = first_part

    def embed_batch():
        if batch:
            vectors = model.embed_photos([p.image for p in batch])
            rows.extend((p.id, p.path, v, p.label) for p, v in zip(batch, vectors, strict=True))
            batch.clear()

    for item in tqdm.tqdm(photos, total=total, desc="embedding", unit="photo"):
        if isinstance(item, photo_files.Skipped):
            skipped.append(item)
        else:
            batch.append(item)
        if len(batch) >= EMBED_BATCH:
            embed_batch()
        if len(rows) + len(batch) + len(skipped) >= part_size:
            embed_batch()
            _write_part(directory, number, rows, skipped)
            number, rows, skipped = number + 1, [], []
    embed_batch()
    if rows or skipped:
        _write_part(directory, number, rows, skipped)


def build_index(
    directory: str,
    model: photo_model.PhotoModel,
    *,
    images: Sequence[str] = (),
    data_dir: str | None = None,
    split: str | None = None,
    non_landmark_split: str | None = None,
    part_size: int = PART_SIZE,
) -> dict[str, Any]:
    """Embeds photos (files, or a TFDS split) into an index folder.

    Args:
      directory: the index folder (local or gs://); an existing one is
        continued (its model must be `model`).
      model: the descriptor (photo_model.from_run / from_saved_model).
      images: folders, globs, gs:// prefixes or files (photo_files).
      data_dir, split: a TFDS build's split instead of files; a labelled
        split (train) makes an index `--recognize` can use.
      non_landmark_split: with a TFDS split, a split of known non-landmark
        images to embed beside it (recognition's penalty); None: the
        model's eval.non_landmark_split when the split is labelled.
      part_size: photos per part file.

    Returns:
      The index's info (index_info.json), with 'resumed': photos that were
      already embedded.

    Raises:
      ValueError: no source or both; a source with no files; another model.
    """
    if bool(images) == bool(split):
        raise ValueError(
            "give photos (--images) or a TFDS split (--data_dir and --split), not both"
        )
    if split and not data_dir:
        raise ValueError("--split needs --data_dir (a TFDS build)")
    source = {"images": list(images)} if images else {"data_dir": data_dir, "split": split}
    # The source is checked before the index records it: a typo must not
    # become the index's source.
    if split:
        data_format.read_split_info(data_dir, split)
    else:
        paths = photo_files.list_photo_files(images)
    info = _start(directory, model, source)
    if split:
        info["source"] = source
        rows, skipped, resumed = _embed_split(directory, model, data_dir, split)
        labelled = data_format.read_split_info(data_dir, split).labeled
        if non_landmark_split is None and labelled and model.config is not None:
            non_landmark_split = model.config.eval.non_landmark_split or None
        if non_landmark_split:
            non_landmarks, _, _ = _embed_split(directory, model, data_dir, non_landmark_split)
            file_io.save_npz(
                file_io.join(directory, NON_LANDMARKS_FILE),
                ids=non_landmarks["ids"],
                embeddings=non_landmarks["embeddings"],
            )
        info["non_landmark_split"] = non_landmark_split or None
    else:
        sources = sorted(set(info["source"].get("images", [])) | set(images))
        info["source"] = {"images": sources}
        done = _done_paths(directory)
        todo = [p for p in paths if p not in done]
        resumed = len(paths) - len(todo)
        if resumed:
            logging.info("resuming %s: %d photo(s) done, %d to go", directory, resumed, len(todo))
        _embed_parts(
            directory,
            model,
            photo_files.read_photos(todo, photo_files.photo_ids(todo)),
            len(todo),
            len(_parts(directory)),
            part_size,
        )
        rows, skipped = _merge_parts(directory)
        labelled = False
    return _finish(directory, info, rows, skipped, labelled, resumed)


def _done_paths(directory: str) -> set[str]:
    done: set[str] = set()
    for part in _parts(directory):
        done.update(str(p) for p in part["paths"])
        done.update(s["path"] for s in json.loads(str(part["skipped"])))
    return done


def _merge_parts(directory: str) -> tuple[dict[str, np.ndarray], list[dict[str, str]]]:
    parts = _parts(directory)
    paths = np.concatenate([p["paths"] for p in parts]).astype(str)
    dims = {p["embeddings"].shape[1] for p in parts if len(p["paths"])}
    rows = {
        # Ids over the whole index (a stem shared by two files becomes their paths).
        "ids": np.asarray(photo_files.photo_ids(list(paths)), dtype=str),
        "paths": paths,
        "embeddings": np.concatenate(
            [p["embeddings"].reshape(len(p["paths"]), max(dims, default=0)) for p in parts]
        ).astype(np.float32),
        "labels": np.concatenate([p["labels"] for p in parts]).astype(np.int64),
    }
    skipped = [s for p in parts for s in json.loads(str(p["skipped"]))]
    return rows, skipped


def _embed_split(directory: str, model: photo_model.PhotoModel, data_dir: str, split: str):
    """A TFDS split's rows, labelled with landmark ids: by extraction for a run
    (evaluation.embed_split, cached in the index's eval/ folder: a rerun
    reuses it), image by image for a SavedModel.

    Returns:
      (rows as _merge_parts', no skipped files, rows reused from the cache).
    """
    if model.kind == "run":
        config = model.config.copy_and_resolve_references()
        config.data_dir = data_dir
        cache = file_io.join(directory, evaluation.EVAL_DIR)
        cached = bool(file_io.glob(file_io.join(cache, f"embeddings-{split}-*.npz")))
        emb = evaluation.embed_split(
            config, directory, split, model.members, model.models, sharding.create_mesh()
        )
        ids, embeddings = emb.ids, emb.embeddings
        label_map = None
        if data_format.read_split_info(data_dir, split).labeled:
            label_map = data_format.read_label_map(data_dir)
        # Contiguous labels -> landmark ids, -1 kept.
        labels = (
            np.where(emb.labels >= 0, label_map.landmark_ids[np.maximum(emb.labels, 0)], -1)
            if label_map is not None
            else np.full(len(ids), photo_files.NO_LABEL)
        )
    else:
        cached = False
        total = data_format.read_split_info(data_dir, split).num_examples
        ids, labels, parts, batch = [], [], [], []
        # Streamed: a batch of decoded images at a time, never the split.
        records = photo_files.split_records(data_dir, split)
        for photo in tqdm.tqdm(records, total=total, desc=f"embedding {split}", unit="photo"):
            ids.append(photo.id)
            labels.append(photo.label)
            batch.append(photo.image)
            if len(batch) == EMBED_BATCH:
                parts.append(model.embed_photos(batch))
                batch = []
        if batch:
            parts.append(model.embed_photos(batch))
        embeddings = np.concatenate(parts) if parts else np.zeros((0, 0), np.float32)
    rows = {
        "ids": np.asarray(ids, dtype=str),
        "paths": np.full(len(ids), "", dtype=str),
        "embeddings": np.asarray(embeddings, np.float32),
        "labels": np.asarray(labels, np.int64),
    }
    return rows, [], len(ids) if cached else 0


def _finish(directory, info, rows, skipped, labelled, resumed) -> dict[str, Any]:
    """Writes embeddings.npz, the ScaNN index when large enough, and the info."""
    if len(rows["ids"]) == 0:
        raise ValueError(
            f"no photo of {info['source']} could be embedded: "
            + photo_files.count_skipped(photo_files.Skipped(**s) for s in skipped)
        )
    file_io.save_npz(file_io.join(directory, EMBEDDINGS_FILE), **rows)
    scann_dir = file_io.join(directory, SCANN_DIR)
    info["scann"] = None
    if (
        len(rows["ids"]) >= knn.MIN_TREE_POINTS
        and info["search"]["knn_backend"] == "scann"
        and knn.scann_available()
        and not file_io.is_url(directory)
    ):
        # Built once here, not at every query: a tree over millions of rows
        # takes minutes.
        k = min(int(info["search"]["k"]), len(rows["ids"]))
        knn.ScannSearcher.build(rows["embeddings"], num_neighbors=k).save(scann_dir)
        info["scann"] = SCANN_DIR
    info.update(
        count=len(rows["ids"]),
        descriptor_dim=int(rows["embeddings"].shape[1]),
        labelled=bool(labelled),
        skipped=skipped,
        complete=True,
    )
    file_io.write_json(_info_path(directory), info)
    return {**info, "resumed": resumed}


def load_index(directory: str) -> PhotoIndex:
    """An index `build_index` wrote.

    Raises:
      FileNotFoundError: not an index, or one whose build has not finished.
    """
    info = _read_info(directory)
    if info is None or not info.get("complete"):
        what = "is not a photo index" if info is None else "has not finished building"
        raise FileNotFoundError(
            f"{directory} {what}: run `python -m landmark_jax.search index "
            f"--index_dir={directory} ...` (it continues an interrupted build)"
        )
    rows = file_io.load_npz(file_io.join(directory, EMBEDDINGS_FILE))
    non_landmarks = None
    if info.get("non_landmark_split"):
        non_landmarks = file_io.load_npz(file_io.join(directory, NON_LANDMARKS_FILE))["embeddings"]
    return PhotoIndex(
        directory,
        info,
        rows["ids"].astype(str),
        rows["paths"].astype(str),
        rows["embeddings"].astype(np.float32),
        rows["labels"].astype(np.int64),
        non_landmarks,
    )
