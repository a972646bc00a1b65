"""Revisited Oxford/Paris evaluation of a trained workdir (ROxford5k, RParis6k).

`evaluate_revisited(model, data_dir)` embeds the `revisited_db` and
`revisited_query` splits of a TFDS build of data_pipelines.revisited_builder
(`revisited_oxford_paris/roxford5k`, ...; queries already cropped to their
bbx), ranks the whole database for every query by exact search (squared L2
on unit vectors, i.e. cosine), and scores the ranking with
`metrics.revisited_map` against the ground truth the build carries in its
metadata (`read_gnd`) under the easy, medium and hard protocols.

Images keep their aspect ratio. The default, resize='native', is the papers'
protocol: each database image and each cropped query is scaled by every
scale s from its own size (DOLG's evaler, `cv2.resize` fx = fy = s, bilinear;
the ROxf/RPar images are at most 1024 px, so this is also cirtorch's setting
at imsize 1024, which only shrinks), so a small query crop is not enlarged.
'longer_side' instead brings every image's longer side to image_size * s;
'square' is the GLDv2 squash, not comparable with the papers. See
extract.py for how the differently shaped images are batched.

Writes to `<workdir>/eval/`: `revisited.json` (the means, per-query APs and
how the embeddings were made), `revisited_ranks.npy` (int32 [Q, N]: row q
holds the imlist indices best first for qimlist[q], the input of
`revisited_map`), and the embeddings `embeddings-revisited_db.npz` and
`embeddings-revisited_query.npz` in gnd order, so the ranking can be checked
or recomputed without the model.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

from landmark_jax.data import data_format, revisited_gnd
from landmark_jax.retrieval import (
    exact_search,
    extract,
    metrics,
    rerank,
    rerank_evaluation,
    superglobal_extraction,
)
from landmark_jax.runtime import file_io, sharding

# data_pipelines.revisited_builder's splits (a split name of a TFDS build).
DB_SPLIT = "revisited_db"
QUERY_SPLIT = "revisited_query"
RESULTS_FILE = "revisited.json"
RANKS_FILE = "revisited_ranks.npy"
PROTOCOLS = ("easy", "medium", "hard")


def embeddings_path(workdir: str, split: str) -> str:
    """Where evaluate_revisited saves a split's embeddings (in gnd order)."""
    return file_io.join(workdir, extract.EVAL_DIR, f"embeddings-{split}.npz")


def read_gnd(data_dir: str) -> dict[str, Any]:
    """The ground truth a Revisited build carries in its metadata, checked.

    Args:
      data_dir: a TFDS build of data_pipelines.revisited_builder, or a
        folder with exactly one build below it (data_format.find_build).

    Returns:
      The ground truth as revisited_gnd.parse_revisited_gnd returns it
      (imlist, qimlist, and per query bbx, easy, hard, junk).

    Raises:
      data_format.DataFormatError: not a TFDS build, a build without the
        ground truth (not a revisited_oxford_paris build), or a ground truth
        failing parse_revisited_gnd's checks (naming the metadata file).
    """
    builder = data_format.open_build(data_dir)
    where = file_io.join(str(builder.data_dir), "metadata.json")
    gnd = (builder.info.metadata or {}).get(data_format.REVISITED_GND)
    if gnd is None:
        raise data_format.DataFormatError(
            f"{where}: no {data_format.REVISITED_GND!r} (the Revisited ground truth): "
            f"{builder.info.full_name} is not a Revisited Oxford/Paris build; build one with "
            "python -m data_pipelines.build_dataset --dataset=revisited_oxford_paris/roxford5k"
        )
    return revisited_gnd.parse_revisited_gnd(gnd, f"{where}: {data_format.REVISITED_GND}")


def in_gnd_order(
    emb: extract.Embeddings, names: Sequence[str], split: str, data_dir: str
) -> extract.Embeddings:
    """The embeddings reordered to the gnd list, checking every name is there once.

    A revisited_builder build holds its splits in gnd order, so one process
    reading them in order needs nothing; several processes each read every
    n-th shard, so the gathered rows come interleaved, and a build written
    by another builder may hold any order (TFDS shuffles by default).

    Args:
      emb: the extracted split.
      names: the gnd's imlist (database) or qimlist (queries).
      split: the split name, for errors.
      data_dir: the data folder, for errors.

    Returns:
      Embeddings whose ids equal `names`, in that order.

    Raises:
      ValueError: the split repeats an id, lacks a gnd name or holds an image
        the gnd does not list (a stale or foreign split: rebuild it).
    """
    ids = [str(i) for i in emb.ids]
    if ids == list(names):
        return emb
    row_of: dict[str, int] = {}
    for row, image_id in enumerate(ids):
        if image_id in row_of:
            raise ValueError(f"{data_dir}: split {split!r} holds image {image_id!r} twice")
        row_of[image_id] = row
    missing = [n for n in names if n not in row_of]
    extra = sorted(set(row_of) - set(names))
    if missing or extra:
        raise ValueError(
            f"{data_dir}: split {split!r} does not match the build's ground truth: "
            f"{len(missing)} gnd image(s) missing (e.g. {missing[:3]}), {len(extra)} not in "
            f"the gnd (e.g. {extra[:3]}); rebuild it with data_pipelines.build_dataset"
        )
    order = np.array([row_of[n] for n in names], np.int64)
    return extract.Embeddings(
        emb.ids[order], emb.embeddings[order], emb.labels[order], emb.settings
    )


def rank_database(queries: np.ndarray, database: np.ndarray) -> np.ndarray:
    """Every database index for every query, nearest first (exact search, k = N).

    Args:
      queries: [Q, D] unit embeddings.
      database: [N, D] unit embeddings.

    Returns:
      int64 [Q, N] ranks, best first, the layout metrics.revisited_map takes.
    """
    _, ranks = exact_search.exact_search(queries, database, k=database.shape[0])
    return ranks


def _json_number(x: float) -> float | None:
    # JSON has no NaN: a protocol whose queries all lack positives reads null.
    return None if math.isnan(x) else float(x)


def evaluate_revisited(
    model: extract.TrainedModel,
    data_dir: str,
    *,
    scales: Sequence[float] = (1.0,),
    flip: bool = False,
    resize: str = "native",
    image_size: int | None = None,
    size_multiple: int = 1,
    rerank_steps: Sequence[rerank.RerankStep] = (),
    superglobal: Mapping[str, Any] | None = None,
) -> dict[str, dict[str, float]]:
    """Revisited Oxford/Paris mAP and mP@k of a restored run.

    Args:
      model: the run (restored_runs.load_trained_model), restored once by the
        caller; results go to `<model.workdir>/eval/`.
      data_dir: a TFDS build of data_pipelines.revisited_builder (its
        `revisited_db` and `revisited_query` splits and the ground truth in
        its metadata), or a folder with exactly one build below it.
      scales: image-size multipliers averaged by extraction.
      flip: also average the left-right flipped view.
      resize: 'native' (each image scaled by s, aspect kept: the papers'
        protocol), 'longer_side' (aspect kept, longer side image_size * s) or
        'square'.
      image_size: the base side of 'longer_side' and 'square' (default the
        run's image_size); unused by 'native'.
      size_multiple: aspect-kept modes: sides rounded to a multiple of it,
        fewer programs to compile at a small deviation from the exact size;
        1 (exact) for paper numbers.
      rerank_steps: eval.rerank's steps (rerank.parse_steps), applied to
        the whole-database ranking (exact search); the database's
        self-search is kept in <workdir>/eval/ (rerank_evaluation).
      superglobal: SuperGlobal's pooling options
        (superglobal_extraction.options_from_config; None: off), applied
        to the extraction and recorded in the settings.

    Returns:
      {'easy'|'medium'|'hard': {'map', 'mp@1', 'mp@5', 'mp@10'}} as fractions
      (papers print them x100) of the last ranking; NaN where a protocol has
      no scorable query. With rerank_steps, also 'rerank': {label: {protocol:
      {'map', 'mp@10'}, 'seconds'}} of every ranking, the first search's
      included. The per-query APs (of the last ranking) are in revisited.json.

    Raises:
      data_format.DataFormatError: data_dir is not a Revisited build (see
        read_gnd), or a split is missing or its shards disagree with
        dataset_info.json.
      ValueError: the extracted ids do not match the gnd's image lists, or
        a bad resize mode, scale or size_multiple.
    """
    gnd = read_gnd(data_dir)
    workdir = model.workdir
    mesh = sharding.create_mesh()
    options = dict(
        scales=scales,
        flip=flip,
        data_dir=data_dir,
        mesh=mesh,
        resize=resize,
        image_size=image_size,
        size_multiple=size_multiple,
        superglobal=superglobal,
    )
    database = extract.extract(model, DB_SPLIT, **options)
    queries = extract.extract(model, QUERY_SPLIT, **options)
    database = in_gnd_order(database, gnd["imlist"], DB_SPLIT, data_dir)
    queries = in_gnd_order(queries, gnd["qimlist"], QUERY_SPLIT, data_dir)

    stages: dict[str, Any] = {}
    if rerank_steps:
        out_dir = file_io.join(workdir, extract.EVAL_DIR)
        rankings = rerank_evaluation.searches(
            queries.embeddings,
            database.embeddings,
            rerank_steps,
            len(database.ids),
            "exact",
            file_io.join(out_dir, rerank_evaluation.NEIGHBOURS_FILE.format(split=DB_SPLIT)),
            jax.process_index() == 0,
        )
        for ranking in rankings:
            stages[ranking.label] = {
                **rerank_evaluation.revisited_figures(
                    metrics.revisited_map(ranking.neighbors, gnd["gnd"])
                ),
                "seconds": ranking.seconds,
            }
        ranks = rankings[-1].neighbors
    else:
        ranks = rank_database(queries.embeddings, database.embeddings)
    scored = metrics.revisited_map(ranks, gnd["gnd"])
    results = {p: {k: float(v) for k, v in scored[p].items() if k != "aps"} for p in PROTOCOLS}

    if jax.process_index() == 0:
        settings = {
            "workdir": file_io.absolute(workdir),
            "step": model.step,
            "data_dir": data_dir,
            "scales": [float(s) for s in scales],
            "flip": bool(flip),
            "resize": resize,
            "image_size": None if resize == "native" else image_size or model.config.image_size,
            "size_multiple": int(size_multiple),
            "superglobal": dict(superglobal or superglobal_extraction.OFF),
            "num_db": len(gnd["imlist"]),
            "num_queries": len(gnd["qimlist"]),
        }
        for split, emb in ((DB_SPLIT, database), (QUERY_SPLIT, queries)):
            extract.Embeddings(emb.ids, emb.embeddings, emb.labels, settings).save(
                embeddings_path(workdir, split)
            )
        report: dict[str, Any] = {
            p: {k: _json_number(v) for k, v in results[p].items()} for p in PROTOCOLS
        }
        report["per_query_ap"] = {
            "queries": list(gnd["qimlist"]),
            **{p: [_json_number(a) for a in scored[p]["aps"]] for p in PROTOCOLS},
        }
        report["settings"] = settings
        # int32 halves the file; imlist indices stay far below 2**31.
        out_dir = file_io.join(workdir, extract.EVAL_DIR)
        buffer = io.BytesIO()
        np.save(buffer, ranks.astype(np.int32))
        file_io.write_bytes(file_io.join(out_dir, RANKS_FILE), buffer.getvalue())
        file_io.write_text(file_io.join(out_dir, RESULTS_FILE), json.dumps(report, indent=2))
    if stages:
        results["rerank"] = stages
    return results


def format_results(results: dict[str, dict[str, float]]) -> str:
    """The easy/medium/hard table, x100 as papers print it."""
    keys = list(results[PROTOCOLS[0]])
    lines = ["protocol " + " ".join(f"{k:>7s}" for k in keys)]
    for protocol in PROTOCOLS:
        entry = results[protocol]
        lines.append(f"{protocol:8s} " + " ".join(f"{100 * entry[k]:7.2f}" for k in keys))
    return "\n".join(lines)
