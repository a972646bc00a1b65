"""New photos against an index: ranked neighbours, recognition, and what is written.

Ranking is the evaluation's: the queries' descriptors searched against the
index's by squared L2 with the index's eval.knn_backend, through the same
call (knn.search; a ScaNN index the build saved when it is large enough), so
a photo's neighbours are those `evaluate` would list for it. The score shown
beside a neighbour is its cosine, 1 - d^2 / (2 |x|^2) (|x|^2 = 1 for one
run, the sum of squared weights for an ensemble).

`--recognize` labels each query as recognition_evaluation does for eval.*:
its eval.recognition_k nearest images of a labelled split vote for their
landmark with weight max(cos, 0)^eval.recognition_power
(recognition.knn_vote), and, when the index holds a non-landmark split, the
confidence loses eval.non_landmark_weight x its vote sum over the
eval.non_landmark_k nearest non-landmark images (non_landmarks). The
classifier-head fusion is not applied (a SavedModel has no head).

Written to the output folder: neighbours.csv (query, rank, id, path, score,
distance), neighbours.json (the same per query, with the models and the
skipped files), recognition.csv with --recognize, and gallery.png: each
query beside its neighbours, drawn by the evaluation's gallery
(gallery.render_gallery), unjudged results framed gray.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
from collections.abc import Sequence
from typing import Any

import numpy as np

from landmark_jax.retrieval import (
    gallery,
    knn,
    recognition,
    recognition_evaluation,
    rerank,
    rerank_evaluation,
)
from landmark_jax.retrieval import non_landmarks as non_landmark_penalty
from landmark_jax.runtime import file_io
from landmark_jax.serving import photo_files, photo_index, photo_model

NEIGHBOURS_CSV = "neighbours.csv"
NEIGHBOURS_JSON = "neighbours.json"
RECOGNITION_CSV = "recognition.csv"
GALLERY = "gallery.png"
# Rows of the gallery (the CSV and JSON hold every query).
GALLERY_QUERIES = 16


@dataclasses.dataclass
class QueryResult:
    """Queries and what the index answered.

    Attributes:
      ids, paths: the query photos (files read and decoded).
      embeddings: [Q, D] their descriptors.
      neighbors: [Q, k] row numbers of the index, -1 for none.
      distances: [Q, k] squared L2.
      scores: [Q, k] cosines.
      skipped: query files that were not photos, or unreadable.
      landmarks, confidences: [Q] with recognition (-1: no prediction).
    """

    ids: list[str]
    paths: list[str]
    embeddings: np.ndarray
    neighbors: np.ndarray
    distances: np.ndarray
    scores: np.ndarray
    skipped: list[photo_files.Skipped]
    landmarks: np.ndarray | None = None
    confidences: np.ndarray | None = None


def nearest(index: photo_index.PhotoIndex, queries: np.ndarray, k: int):
    """(squared L2 [Q, k'], rows [Q, k']) of the queries' nearest index rows,
    k' = min(k, N), searched as the evaluation's retrieval searches."""
    k = min(int(k), len(index.ids))
    backend = index.info["search"]["knn_backend"]
    if index.info.get("scann") and backend == "scann" and knn.scann_available():
        searcher = knn.ScannSearcher.load(file_io.join(index.directory, index.info["scann"]))
        return searcher.search(queries, k)
    return knn.search(queries, index.embeddings, k, backend=backend)


def query_photos(
    index: photo_index.PhotoIndex,
    model: photo_model.PhotoModel,
    images: Sequence[str],
    k: int,
    *,
    recognize: bool = False,
    rerank_steps: Sequence[rerank.RerankStep] = (),
) -> QueryResult:
    """Embeds query photos with the index's model and searches them.

    Args:
      index: the loaded index.
      model: the index's model (refused otherwise).
      images: query folders, globs, prefixes or files.
      k: neighbours per query.
      recognize: also label each query with a landmark (a labelled index).
      rerank_steps: eval.rerank's steps (rerank.parse_steps) applied to the
        search, as evaluate applies them; the index's self-search (dba,
        k_reciprocal) is kept in the index folder. The neighbours and
        scores are the last ranking's (scores: cosines of unit rows, after
        superglobal its final scores); recognition votes with the first
        search's.

    Raises:
      ValueError: another model than the index's; --recognize on an index
        without labels; no query photo could be read.
    """
    photo_index.check_model(index.directory, index.info, model)
    if recognize and not index.labelled:
        raise ValueError(
            f"--recognize needs an index of a labelled split, and {index.directory} was built "
            f"from {index.info['source']}: build one with `python -m landmark_jax.search index "
            "--data_dir=BUILD --split=train --index_dir=DIR ...`"
        )
    paths = photo_files.list_photo_files(images)
    photos, skipped = [], []
    for item in photo_files.read_photos(paths):
        (skipped if isinstance(item, photo_files.Skipped) else photos).append(item)
    if not photos:
        raise ValueError(
            f"no query photo in {list(images)} could be read: " + photo_files.count_skipped(skipped)
        )
    embeddings = model.embed_photos([p.image for p in photos])
    norm2 = index.info["squared_norm"]
    if rerank_steps:
        last = rerank_evaluation.searches(
            embeddings,
            index.embeddings,
            rerank_steps,
            min(int(k), len(index.ids)),
            index.info["search"]["knn_backend"],
            file_io.join(index.directory, rerank_evaluation.NEIGHBOURS_FILE.format(split="index")),
            writes=True,
        )[-1]
        distances, neighbors, norm2 = last.distances, last.neighbors, 1.0  # unit rows
    else:
        distances, neighbors = nearest(index, embeddings, k)
    scores = np.where(neighbors >= 0, 1.0 - distances / (2.0 * norm2), np.nan)
    result = QueryResult(
        [p.id for p in photos],
        [p.path for p in photos],
        embeddings,
        neighbors,
        distances,
        scores,
        skipped,
    )
    if recognize:
        result.landmarks, result.confidences = recognize_landmarks(index, embeddings)
    return result


def recognize_landmarks(
    index: photo_index.PhotoIndex, queries: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Landmark id and confidence per query, as recognition_evaluation labels test images.

    Returns:
      (landmark ids [Q] int64, -1 for none; confidences [Q] float64).
    """
    settings, norm2 = index.info["search"], index.info["squared_norm"]
    power = settings["recognition_power"]
    backend = settings["knn_backend"]
    neighbors, cosine = recognition_evaluation.nearest_cosines(
        queries, index.embeddings, settings["recognition_k"], backend, norm2
    )
    labels, scores = recognition.knn_vote(
        recognition.neighbor_landmarks(neighbors, index.labels), cosine, power=power
    )
    if index.non_landmarks is not None:
        # Unset: as many neighbours as the landmark vote (eval.non_landmark_k).
        k = settings["non_landmark_k"] or settings["recognition_k"]
        _, non_landmark_cosine = recognition_evaluation.nearest_cosines(
            queries, index.non_landmarks, k, backend, norm2
        )
        scores = non_landmark_penalty.penalize_non_landmarks(
            scores, non_landmark_cosine, power=power, weight=settings["non_landmark_weight"]
        )
    return labels, scores


def _neighbours(index, result: QueryResult, q: int) -> list[dict[str, Any]]:
    return [
        {
            "rank": rank,
            "id": str(index.ids[row]),
            "path": str(index.paths[row]),
            "score": float(result.scores[q, rank - 1]),
            "distance": float(result.distances[q, rank - 1]),
        }
        for rank, row in enumerate(result.neighbors[q], 1)
        if row >= 0
    ]


def write_outputs(
    output: str,
    index: photo_index.PhotoIndex,
    model: photo_model.PhotoModel,
    result: QueryResult,
    *,
    gallery_queries: int = GALLERY_QUERIES,
) -> dict[str, str]:
    """Writes neighbours.csv/.json, recognition.csv (with labels) and gallery.png.

    Returns:
      {what: path} of the files written.
    """
    file_io.makedirs(output)
    written = {}
    per_query = []
    table = io.StringIO()
    writer = csv.writer(table, lineterminator="\n")
    writer.writerow(["query", "rank", "id", "path", "score", "distance"])
    for q, query_id in enumerate(result.ids):
        neighbours = _neighbours(index, result, q)
        for n in neighbours:
            writer.writerow(
                [
                    query_id,
                    n["rank"],
                    n["id"],
                    n["path"],
                    f"{n['score']:.6f}",
                    f"{n['distance']:.6f}",
                ]
            )
        entry = {"id": query_id, "path": result.paths[q], "neighbours": neighbours}
        if result.landmarks is not None:
            entry["landmark_id"] = int(result.landmarks[q])
            entry["confidence"] = float(result.confidences[q])
        per_query.append(entry)
    written["neighbours_csv"] = file_io.join(output, NEIGHBOURS_CSV)
    file_io.write_text(written["neighbours_csv"], table.getvalue())
    written["neighbours_json"] = file_io.join(output, NEIGHBOURS_JSON)
    file_io.write_text(
        written["neighbours_json"],
        json.dumps(
            {
                "index": index.directory,
                "model": model.describe(),
                "queries": per_query,
                "skipped": [s.as_json() for s in result.skipped],
            },
            indent=2,
        ),
    )
    if result.landmarks is not None:
        table = io.StringIO()
        writer = csv.writer(table, lineterminator="\n")
        writer.writerow(["query", "path", "landmark_id", "confidence"])
        for q, query_id in enumerate(result.ids):
            label = int(result.landmarks[q])
            confidence = f"{result.confidences[q]:.6f}" if label >= 0 else ""
            writer.writerow([query_id, result.paths[q], label if label >= 0 else "", confidence])
        written["recognition_csv"] = file_io.join(output, RECOGNITION_CSV)
        file_io.write_text(written["recognition_csv"], table.getvalue())
    if gallery_queries > 0:
        written["gallery"] = file_io.join(output, GALLERY)
        write_gallery(written["gallery"], index, model, result, gallery_queries)
    return written


def write_gallery(
    path: str,
    index: photo_index.PhotoIndex,
    model: photo_model.PhotoModel,
    result: QueryResult,
    num_queries: int = GALLERY_QUERIES,
    *,
    thumb: int = 96,
    max_results: int = 8,
) -> None:
    """The first `num_queries` queries and their neighbours, as the evaluation's gallery."""
    shown = range(min(num_queries, len(result.ids)))
    max_results = min(max_results, result.neighbors.shape[1])  # no empty columns for a small k
    rows_needed = {int(r) for q in shown for r in result.neighbors[q, :max_results] if r >= 0}
    thumbs = _index_thumbnails(index, sorted(rows_needed), thumb)
    rows = []
    for q in shown:
        if result.landmarks is not None and result.landmarks[q] >= 0:
            caption = f"landmark {result.landmarks[q]} {result.confidences[q]:.3f}"
        else:
            caption = f"top cos {result.scores[q, 0]:.3f}"
        results = [
            (str(index.ids[r]), thumbs[int(r)], None)
            for r in result.neighbors[q, :max_results]
            if r >= 0
        ]
        query_image = gallery.thumbnail(file_io.read_bytes(result.paths[q]), thumb)
        rows.append(gallery.GalleryRow(result.ids[q], query_image, results, caption=caption))
    gallery.render_gallery(
        rows,
        path,
        thumb=thumb,
        max_results=max_results,
        title=f"{index.directory}: {model.describe()}",
    )


def _index_thumbnails(index: photo_index.PhotoIndex, rows: list[int], thumb: int) -> dict:
    """Thumbnails of index rows: from their files, or from the TFDS split they came from."""
    out = {
        r: gallery.thumbnail(file_io.read_bytes(index.paths[r]), thumb)
        for r in rows
        if index.paths[r]
    }
    from_split = [r for r in rows if not index.paths[r]]
    if from_split:
        source = index.info["source"]
        by_id = gallery.read_images_by_id(
            source["data_dir"], source["split"], [index.ids[r] for r in from_split], thumb
        )
        out.update({r: by_id[index.ids[r]] for r in from_split})
    return out
