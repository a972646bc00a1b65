"""Metrics per usage: scoring GLDv2 predictions against a solution, split Public/Private.

A solution read by `solutions.read_*_solution` splits its test ids by Usage.
These functions split predictions the same way (as DELF's ReadPredictions
does: ignored ids are accepted and dropped, unknown ids are errors), score each
split and the two together ('All') with `metrics`, and format the result as
compute_retrieval_metrics.py / compute_recognition_metrics.py print it.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from landmark_jax.retrieval import metrics, solutions
from landmark_jax.retrieval.solutions import (
    ALL,
    IGNORED,
    USAGES,
    RecognitionSolution,
    RetrievalSolution,
)


def split_predictions(
    predictions: Mapping[str, Any], solution: Mapping[str, Any]
) -> dict[str, dict[str, Any]]:
    """Splits predictions by usage, as DELF's ReadPredictions does.

    Args:
      predictions: test id -> prediction (either task).
      solution: a read_*_solution result.

    Returns:
      {'Public': {...}, 'Private': {...}}; predictions for ignored ids are dropped.

    Raises:
      ValueError: a predicted id is in no usage of the solution.
    """
    ignored = set(solution[IGNORED])
    split: dict[str, dict[str, Any]] = {usage: {} for usage in USAGES}
    for test_id, prediction in predictions.items():
        for usage in USAGES:
            if test_id in solution[usage]:
                split[usage][test_id] = prediction
                break
        else:
            if test_id not in ignored:
                raise ValueError(f"Test image {test_id!r} is not part of the solution")
    return split


def _by_usage(predictions, solution) -> Iterator[tuple[str, dict, dict]]:
    split = split_predictions(predictions, solution)
    everything_p: dict[str, Any] = {}
    everything_s: dict[str, Any] = {}
    for usage in USAGES:
        everything_p.update(split[usage])
        everything_s.update(solution[usage])
        yield usage, split[usage], solution[usage]
    yield ALL, everything_p, everything_s


def retrieval_metrics_by_usage(
    predictions: Mapping[str, Sequence[str]],
    solution: RetrievalSolution,
    max_predictions: int = 100,
) -> dict[str, dict[str, float]]:
    """mAP@100, mP@{1,5,10,50,100} and first-hit positions per usage.

    The numbers compute_retrieval_metrics.py prints, plus the two splits together.

    Args:
      predictions: query id -> index ids, best first (ignored ids allowed).
      solution: a read_retrieval_solution result.
      max_predictions: the cutoff of mAP and positions (100 on Kaggle).

    Returns:
      {'Public'|'Private'|'All': {'map@100', 'mp@1', 'mp@5', 'mp@10', 'mp@50',
      'mp@100', 'mean_position', 'median_position'}}. 'All' scores the two
      splits together; a usage without queries is left out.

    Raises:
      ValueError: a predicted query id is not in the solution.
    """
    results: dict[str, dict[str, float]] = {}
    for usage, preds, sol in _by_usage(predictions, solution):
        if not sol:
            continue
        precisions = metrics.mean_precisions(preds, sol, max_predictions)
        mean_pos, median_pos = metrics.mean_median_position(preds, sol, max_predictions)
        entry = {
            f"map@{max_predictions}": metrics.mean_average_precision(preds, sol, max_predictions)
        }
        for k in (1, 5, 10, 50, 100):
            if k <= max_predictions:
                entry[f"mp@{k}"] = float(precisions[k - 1])
        entry["mean_position"] = mean_pos
        entry["median_position"] = median_pos
        results[usage] = entry
    return results


def recognition_metrics_by_usage(
    predictions: Mapping[str, tuple[int, float]],
    solution: RecognitionSolution,
    ignore_non_gt_test_images: bool = False,
) -> dict[str, dict[str, float]]:
    """GAP and top-1 accuracy per usage, as compute_recognition_metrics.py.

    Args:
      predictions: test id -> (landmark id, score) (ignored ids allowed).
      solution: a read_recognition_solution result.
      ignore_non_gt_test_images: see metrics.global_average_precision.

    Returns:
      {'Public'|'Private'|'All': {'gap', 'top1_accuracy'}}; a usage without
      landmark images is left out.

    Raises:
      ValueError: a predicted id is not in the solution.
    """
    results: dict[str, dict[str, float]] = {}
    for usage, preds, sol in _by_usage(predictions, solution):
        if not any(sol.values()):
            continue
        results[usage] = {
            "gap": metrics.global_average_precision(preds, sol, ignore_non_gt_test_images),
            "top1_accuracy": metrics.top1_accuracy(preds, sol),
        }
    return results


def score_against_solution(
    task: str, solution_path: str, predictions: Mapping[str, Any], test_ids: Sequence[str]
) -> tuple[Any, dict[str, dict[str, float]], int]:
    """Reads a task's solution, reports its ids the test split lacks, scores per usage.

    Args:
      task: 'retrieval' or 'recognition'.
      solution_path: the task's solution CSV.
      predictions: test id -> prediction, as the task's *_metrics_by_usage takes.
      test_ids: the ids of the embedded test split.

    Returns:
      (the solution, the metrics per usage, how many scored ids are missing
      from the test split; solutions.ids_not_in warns about them).
    """
    read, score = {
        "retrieval": (solutions.read_retrieval_solution, retrieval_metrics_by_usage),
        "recognition": (solutions.read_recognition_solution, recognition_metrics_by_usage),
    }[task]
    solution = read(solution_path)
    missing = solutions.ids_not_in(solution, test_ids, solution_path)
    return solution, score(predictions, solution), missing
