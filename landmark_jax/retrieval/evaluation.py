"""`evaluate(config, workdir)`: embeddings -> kNN -> metrics and submissions.

Retrieval: the test (query) embeddings are searched against the index
embeddings (k = 100, squared L2 on unit vectors; ScaNN, or exact search on
the accelerator), scored by GLDv2 mAP@100 per Public/Private split.
Recognition (recognition_evaluation.py): each test image takes the landmark
voted by its nearest train images (cos^p scores), scored by GAP; it runs (and
the train split is embedded) only when eval.recognition_solution scores it or
eval.recognition_submission asks for its submission. An ensemble (config.eval.ensemble)
concatenates several workdirs' normalised, weighted embeddings (GLR2020).

Writes `<workdir>/eval/`: metrics.json (`map@100`, `gap`, and per-split
detail), retrieval_submission.csv, recognition_submission.csv, gallery.png
and the embeddings (embeddings-<split>-<member>.npz).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np

from landmark_jax.data import data_format
from landmark_jax.retrieval import (
    baselines,
    ensemble,
    eval_config,
    extract,
    gallery,
    recognition_evaluation,
    rerank,
    rerank_evaluation,
    restored_runs,
    revisited,
    solutions,
    superglobal_extraction,
    usage_metrics,
    validation,
)
from landmark_jax.runtime import file_io, sharding
from landmark_jax.workdir import run_config

# Where `evaluate` writes (<workdir>/eval/): extract's, which the Revisited
# benchmark shares.
EVAL_DIR = extract.EVAL_DIR


def embed_split(
    config: ml_collections.ConfigDict,
    workdir: str,
    split: str,
    members: Sequence[ensemble.EnsembleMember],
    models: Sequence[extract.TrainedModel],
    mesh,
) -> extract.Embeddings:
    """A split's (ensemble) embeddings, cached in <workdir>/eval/ (by process 0).

    Args:
      config: the evaluation config (data_dir, eval.*).
      workdir: where the cache lives (<workdir>/eval/).
      split: the split to embed.
      members: the ensemble members (one for a single run).
      models: each member's restored model, in the same order.
      mesh: the device mesh.
    """
    parts = []
    for i, (member, model) in enumerate(zip(members, models, strict=True)):
        options = extract.extraction_options(config, model, member.image_size)
        settings = {
            "workdir": file_io.absolute(member.workdir),
            "step": model.step,
            "data_dir": config.data_dir,
            # The data itself: a split rebuilt in the same folder is re-embedded.
            "data": data_format.read_split_info(config.data_dir, split).identity,
            **options,
            "scales": list(options["scales"]),
        }
        cache = file_io.join(workdir, EVAL_DIR, f"embeddings-{split}-{i}.npz")
        # Reused only when made by the same checkpoint with the same settings,
        # and only by a single process: processes that disagreed on whether
        # the cache is there would not all join the extraction's collectives.
        if jax.process_count() == 1 and file_io.exists(cache):
            cached = extract.load_cache(cache)  # None when unreadable: extracted again
            if cached is not None and cached.settings == settings:
                parts.append(cached)
                continue
        emb = extract.extract(model, split, data_dir=config.data_dir, mesh=mesh, **options)
        emb = dataclasses.replace(emb, settings=settings)
        if _writes():
            emb.save(cache)
        parts.append(emb)
    ids, aligned = ensemble.align_by_ids([(p.ids, p.embeddings) for p in parts])
    combined = ensemble.combine_embeddings(aligned, [m.weight for m in members])
    return extract.Embeddings(np.asarray(ids), combined, parts[0].labels)


def evaluate(
    config: ml_collections.ConfigDict,
    workdir: str,
    model_overrides: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Evaluates a workdir (or an ensemble) on the data's index/test splits.

    Each model (the workdir's, or every ensemble member's) is rebuilt from its
    own config.json (run_config.evaluation_config); `config` contributes
    `data_dir` and the `eval` block.

    Args:
      config: the command line's config, with its `eval` block.
      workdir: the training workdir; results go to <workdir>/eval/.
      model_overrides: model keys given on the command line, flat
        ('model.input_normalization' -> value); each must equal every
        evaluated workdir's.

    Returns:
      The metrics written to eval/metrics.json.

    Raises:
      FileNotFoundError: no checkpoint or config.json, or a missing solution file.
      ValueError: a bad ensemble entry, predictions for unknown ids, or a
        command-line model key that disagrees with a workdir's config.json.
    """
    eval_config.validate_eval_config(config)
    out_dir = file_io.join(workdir, EVAL_DIR)
    mesh = sharding.create_mesh()
    # Each member is restored once (params and batch statistics), its model
    # rebuilt from its own config.json; without a data_dir of its own, the
    # command line evaluates on the (first) member's training data folder.
    members, models = restored_runs.restore_members(config, workdir, model_overrides)
    config = config.copy_and_resolve_references()
    config.data_dir = models[0].config.data_dir
    ec = config.eval
    if _writes():
        file_io.makedirs(out_dir)  # fails now on a folder that cannot be written

    # Every process takes part in extraction; process 0 writes the files.
    metrics: dict[str, Any] = {"members": [m.workdir for m in members]}
    # GLDv2-style retrieval and recognition; eval.index_split="" leaves the
    # Revisited benchmark alone (a model trained on a train-only data folder).
    if ec.index_split:
        index = embed_split(config, workdir, ec.index_split, members, models, mesh)
        test = embed_split(config, workdir, ec.test_split, members, models, mesh)
        _add(metrics, _retrieval(config, workdir, index, test))
    if ec.index_split and ec.baselines:
        metrics["baselines"] = _baselines(config, models[0], mesh, index.ids)
    if recognition_evaluation.recognition_requested(config):
        train = embed_split(config, workdir, ec.train_split, members, models, mesh)
        non_landmarks = (
            embed_split(config, workdir, ec.non_landmark_split, members, models, mesh)
            if ec.non_landmark_split
            else None
        )
        _add(
            metrics,
            recognition_evaluation.evaluate_recognition(
                config, out_dir, test, train, non_landmarks, members, models[0], mesh, _writes()
            ),
        )
    elif ec.index_split and ec.train_split:
        # Said, not silently skipped: the train split is not embedded.
        logging.info(
            "Recognition skipped: no config.eval.recognition_solution to score it and "
            "config.eval.recognition_submission=False (the %r split is not embedded)",
            ec.train_split,
        )
    if ec.revisited_data_dir:
        own = [t for m, t in zip(members, models, strict=True) if m.workdir == workdir]
        model = (
            own[0]
            if own
            else restored_runs.load_trained_model(
                run_config.evaluation_config(config, workdir), workdir
            )
        )
        metrics["revisited"] = _revisited(config, model)
        if "rerank" in metrics["revisited"]:
            _add(metrics, {"rerank": {"revisited": metrics["revisited"].pop("rerank")}})

    if _writes():
        file_io.write_text(
            file_io.join(out_dir, "metrics.json"), json.dumps(metrics, indent=2, default=float)
        )
    logging.info(
        "Evaluation of %s: %s",
        workdir,
        {k: v for k, v in metrics.items() if k in ("map@100", "gap")},
    )
    return metrics


def _add(metrics: dict[str, Any], more: dict[str, Any]) -> None:
    """metrics.update(more), the benchmarks' re-ranking tables merged."""
    tables = more.pop("rerank", {})
    metrics.update(more)
    if tables:
        metrics.setdefault("rerank", {}).update(tables)


def _writes() -> bool:
    """Whether this process writes the evaluation's files (process 0 does)."""
    return jax.process_index() == 0


def _neighbours_path(workdir: str, split: str) -> str:
    """Where the self-search of a split's descriptors is kept (rerank_evaluation)."""
    return file_io.join(workdir, EVAL_DIR, rerank_evaluation.NEIGHBOURS_FILE.format(split=split))


def _retrieval(config, workdir: str, index, test) -> dict[str, Any]:
    """Test queries against the index: kNN, submission, mAP@100 and gallery."""
    ec, out_dir, metrics = config.eval, file_io.join(workdir, EVAL_DIR), {}
    # eval.rerank: the ranking after each step; the last one is submitted
    # and scored as map@100, each one beside the first search's.
    stages, rankings = {}, []
    if ec.rerank:
        rankings = rerank_evaluation.searches(
            test.embeddings,
            index.embeddings,
            rerank.parse_steps(ec.rerank),
            min(ec.k, len(index.ids)),
            ec.knn_backend,
            _neighbours_path(workdir, ec.index_split),
            _writes(),
        )
        validation.record_scann_recall(ec, index, test, rankings[0].neighbors, metrics)
        for ranking in rankings:
            stages[ranking.label] = rerank_evaluation.ranked_ids(ranking, test.ids, index.ids)
        retrieval = stages[rankings[-1].label]
    else:
        retrieval = validation.ranked_ids(ec, index, test, metrics)
    if _writes():
        solutions.write_retrieval_submission(
            file_io.join(out_dir, "retrieval_submission.csv"), retrieval, all_ids=list(test.ids)
        )
    if ec.retrieval_solution:
        solution, by_usage, metrics["retrieval_queries_missing"] = (
            usage_metrics.score_against_solution(
                "retrieval", ec.retrieval_solution, retrieval, test.ids
            )
        )
        # Index ids the solution lists but the index lacks: never retrievable.
        metrics["retrieval_index_ids_missing"] = solutions.index_ids_not_in(
            solution, index.ids, ec.retrieval_solution
        )
        metrics["map@100"] = by_usage[solutions.ALL]["map@100"]
        if rankings:
            metrics.setdefault("rerank", {})["retrieval"] = {
                ranking.label: {
                    "map@100": usage_metrics.retrieval_metrics_by_usage(
                        stages[ranking.label], solution
                    )[solutions.ALL]["map@100"],
                    "seconds": ranking.seconds,
                }
                for ranking in rankings
            }
        metrics["retrieval"] = by_usage
        metrics["retrieval_queries"] = len(solutions.merged_usages(solution))
        if _writes():
            gallery.write_gallery(
                config.data_dir,
                retrieval,
                solutions.merged_usages(solution),
                file_io.join(out_dir, "gallery.png"),
                num_queries=ec.gallery_queries,
                title=f"{workdir}: mAP@100 {metrics['map@100']:.4f}",
                query_split=ec.test_split,
                index_split=ec.index_split,
            )
    return metrics


def format_metrics(metrics: dict[str, Any]) -> str:
    """The headline figures of `evaluate`'s metrics, one line each: mAP@100 next
    to its baselines, GAP with and without the non-landmark penalty and top-1,
    and the Revisited table; what `python -m landmark_jax.evaluate` prints."""
    lines = [f"{key}: {metrics[key]:.4f}" for key in ("map@100", "gap") if key in metrics]
    if "baselines" in metrics:
        # What training bought, on the same queries with the same metric.
        scored = {"learned": metrics["map@100"], **metrics["baselines"]}
        lines.append(
            f"retrieval mAP@100 on {metrics['retrieval_queries']} queries: "
            + " | ".join(f"{name.replace('_', ' ')} {v:.4f}" for name, v in scored.items())
        )
    if "recognition_top1" in metrics:
        without = metrics.get("gap_without_non_landmark_penalty")
        penalty = "" if without is None else f" (without non-landmark penalty {without:.4f})"
        lines.append(
            f"recognition GAP {metrics['gap']:.4f}{penalty}"
            + f"; top-1 on {metrics['recognition_queries']} recognition queries: "
            + " | ".join(f"{k} {v:.4f}" for k, v in metrics["recognition_top1"].items())
        )
    if "revisited" in metrics:
        lines.append(revisited.format_results(metrics["revisited"]))
    if metrics.get("rerank"):
        lines.append(rerank_evaluation.format_rerank(metrics["rerank"]))
    return "\n".join(lines)


def _baselines(config, model: extract.TrainedModel, mesh, index_ids) -> dict[str, float]:
    """mAP@100 of each of eval.baselines on the learned model's queries.

    The untrained model is extracted as the learned one is; raw pixels at
    eval.raw_pixel_size squared, one view; chance in closed form.
    """
    ec = config.eval
    solution = solutions.read_retrieval_solution(ec.retrieval_solution)
    scored: dict[str, float] = {}
    for name in ec.baselines:
        if name == "chance":
            scored[name] = baselines.chance_map(
                solutions.merged_usages(solution), list(index_ids), num_predictions=ec.k
            )
            continue
        if name == "untrained":
            baseline = baselines.untrained_model(model.config, model.workdir)
            options = extract.extraction_options(config, model)
        else:
            baseline = baselines.raw_pixel_model(model.config)
            options = {"image_size": ec.raw_pixel_size, "scales": (1.0,), "flip": False}
        index, test = (
            extract.extract(baseline, split, data_dir=config.data_dir, mesh=mesh, **options)
            for split in (ec.index_split, ec.test_split)
        )
        by_usage = usage_metrics.retrieval_metrics_by_usage(
            validation.ranked_ids(ec, index, test), solution
        )
        scored[name] = by_usage[solutions.ALL]["map@100"]
    return scored


def _revisited(config, model: extract.TrainedModel) -> dict[str, Any]:
    """Revisited Oxford/Paris easy/medium/hard of one run (cropped queries)."""
    ec = config.eval
    results = revisited.evaluate_revisited(
        model,
        ec.revisited_data_dir,
        scales=tuple(ec.scales),
        flip=ec.flip,
        resize=ec.revisited_resize,
        image_size=ec.image_size,
        size_multiple=int(ec.size_multiple),
        rerank_steps=rerank.parse_steps(ec.rerank),
        superglobal=superglobal_extraction.options_from_config(config),
    )
    logging.info("Revisited:\n%s", revisited.format_results(results))
    return results
