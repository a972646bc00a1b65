"""GLDv2 and Revisited Oxford/Paris metrics, as the public evaluation code computes them.

The GLDv2 functions follow the semantics of DELF's
`google_landmarks_dataset/metrics.py` (the code Kaggle scores mirror); the
Revisited Oxford/Paris function follows cirtorch's `compute_map` with the
easy/medium/hard protocols of Radenovic et al. (CVPR 2018). Quirks that change
numbers are kept on purpose, because a leaderboard or a paper compares against
exactly these definitions:

- mAP@100: a duplicate prediction is skipped but still uses up its rank; the
  AP is divided by min(#ground truth, 100); the mean runs over every query of
  the solution, so a query without a prediction counts as 0.
- GAP: predictions on images without ground truth (non-landmarks) still count
  towards the rank, so confident distractor predictions lower the score;
  the sum is divided by the number of images with ground truth.
- Revisited: junk images are removed from the ranking, AP is the trapezoidal
  area under the precision/recall curve (not the finite sum), and queries
  without positives are left out of the mean.

All values are fractions in [0, 1]; papers print the Revisited numbers x100.
Pure numpy and Python: nothing here imports jax.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np

Label = Hashable

_PROTOCOLS = ("easy", "medium", "hard")
_GND_KEYS = ("easy", "hard", "junk")


def _check_query_ids(predictions: Mapping[str, Any], solution: Mapping[str, Any]) -> None:
    if not solution:
        raise ValueError("the solution has no queries; the mean over them is undefined")
    for query_id in predictions:
        if query_id not in solution:
            raise ValueError(f"Test image {query_id!r} is not part of the solution")


def _check_ranked_list(query_id: str, prediction: Sequence[str]) -> None:
    # A bare string is a Sequence too: "a b c" would be scored character by
    # character and give a plausible-looking wrong number.
    if isinstance(prediction, (str, bytes)):
        raise TypeError(
            f"prediction for {query_id!r} is a string, expected a sequence of ids: "
            f"{prediction[:60]!r}"
        )


def _average_precision(
    prediction: Sequence[str], ground_truth: Sequence[str], max_predictions: int
) -> float:
    """AP@max_predictions of one query, DELF style (see mean_average_precision)."""
    # An empty ground truth (a Public/Private row whose images field is empty
    # or 'None') cannot be retrieved; DELF's reader turns it into one id that
    # never matches, so the query scores 0. Return that instead of 0/0.
    if not ground_truth:
        return 0.0
    relevant = set(ground_truth)
    seen: set[str] = set()
    num_correct = 0
    ap = 0.0
    for i, image_id in enumerate(prediction[:max_predictions]):
        if image_id in seen:
            continue  # skipped, but rank i stays used up
        seen.add(image_id)
        if image_id in relevant:
            num_correct += 1
            ap += num_correct / (i + 1)
    return ap / min(len(ground_truth), max_predictions)


def mean_average_precision(
    predictions: Mapping[str, Sequence[str]],
    solution: Mapping[str, Sequence[str]],
    max_predictions: int = 100,
) -> float:
    """GLDv2 retrieval mAP@max_predictions.

    For each query, walk its first `max_predictions` predicted ids; an id
    already seen for this query is skipped (it is not a hit) but its rank is
    consumed. Each hit at 0-based rank i adds (hits so far)/(i + 1); the sum is
    divided by min(len(ground truth), max_predictions). The mean runs over all
    queries of `solution`, so queries without a prediction count as 0.

    Args:
      predictions: query id -> index ids, best first.
      solution: query id -> relevant index ids (one usage split, or several
        merged). A query with an empty list scores 0 and still counts.
      max_predictions: how many predictions per query are scored.

    Returns:
      The mean average precision, a fraction in [0, 1].

    Raises:
      ValueError: a predicted query id is not in `solution`, or `solution` is
        empty.
      TypeError: a prediction is a string rather than a sequence of ids.
    """
    _check_query_ids(predictions, solution)
    total = 0.0
    for query_id, prediction in predictions.items():
        _check_ranked_list(query_id, prediction)
        total += _average_precision(prediction, solution[query_id], max_predictions)
    return total / len(solution)


def mean_precisions(
    predictions: Mapping[str, Sequence[str]],
    solution: Mapping[str, Sequence[str]],
    max_predictions: int = 100,
) -> np.ndarray:
    """Mean precision at every rank 1..max_predictions (DELF MeanPrecisions).

    P@k of a query is (distinct hits among its first k predictions) / k; ranks
    past the end of a short prediction list add no hits. Queries without a
    prediction contribute P@k = 0 and count in the mean.

    Args:
      predictions: query id -> index ids, best first.
      solution: query id -> relevant index ids.
      max_predictions: the largest k.

    Returns:
      float64 array [max_predictions]; entry k-1 is the mean P@k.

    Raises:
      ValueError: a predicted query id is not in `solution`, or it is empty.
      TypeError: a prediction is a string.
    """
    _check_query_ids(predictions, solution)
    ranks = np.arange(1, max_predictions + 1, dtype=np.float64)
    total = np.zeros(max_predictions, dtype=np.float64)
    for query_id, prediction in predictions.items():
        _check_ranked_list(query_id, prediction)
        relevant = set(solution[query_id])
        seen: set[str] = set()
        hits = np.zeros(max_predictions, dtype=np.float64)
        for i, image_id in enumerate(prediction[:max_predictions]):
            if image_id not in seen:
                seen.add(image_id)
                hits[i] = image_id in relevant
        total += np.cumsum(hits) / ranks
    return total / len(solution)


def mean_median_position(
    predictions: Mapping[str, Sequence[str]],
    solution: Mapping[str, Sequence[str]],
    max_predictions: int = 100,
) -> tuple[float, float]:
    """Mean and median 1-based rank of the first correct prediction (DELF).

    A query whose first `max_predictions` predictions hold no correct id, or
    that has no prediction at all, is placed at max_predictions + 1.

    Args:
      predictions: query id -> index ids, best first.
      solution: query id -> relevant index ids.
      max_predictions: how many predictions per query are looked at.

    Returns:
      (mean position, median position) over all queries of `solution`.

    Raises:
      ValueError: a predicted query id is not in `solution`, or it is empty.
      TypeError: a prediction is a string.
    """
    _check_query_ids(predictions, solution)
    positions = np.full(len(solution), max_predictions + 1, dtype=np.float64)
    for n, (query_id, prediction) in enumerate(predictions.items()):
        _check_ranked_list(query_id, prediction)
        relevant = set(solution[query_id])
        for i, image_id in enumerate(prediction[:max_predictions]):
            if image_id in relevant:
                positions[n] = i + 1
                break
    return float(np.mean(positions)), float(np.median(positions))


def _label_and_score(image_id: str, prediction: Any) -> tuple[Label, float]:
    # DESIGN's form is (label, score); DELF's reader yields {'class', 'score'}.
    if isinstance(prediction, Mapping):
        label, score = prediction["class"], prediction["score"]
    else:
        label, score = prediction
    score = float(score)
    if math.isnan(score):
        raise ValueError(f"prediction for {image_id!r} has a NaN score; it cannot be ranked")
    return label, score


def global_average_precision(
    predictions: Mapping[str, tuple[Label, float]],
    solution: Mapping[str, Sequence[Label]],
    ignore_non_gt_test_images: bool = False,
) -> float:
    """GLDv2 recognition Global Average Precision (micro-AP, Kaggle's GAP).

    Predictions (one per image) are sorted by score descending, ties by image
    id ascending (then class ascending, which never decides since ids are
    unique). Walking that list, every prediction increments the rank `total`;
    a correct one increments `correct` and adds correct/total. The sum is
    divided by the number of solution images with a non-empty ground truth, so
    such images without a prediction count as misses.

    Args:
      predictions: image id -> (label, score), or DELF's {'class', 'score'}.
      solution: image id -> landmark labels; empty for non-landmark images.
      ignore_non_gt_test_images: skip predictions on images with an empty
        ground truth instead of letting them lower precision. False for the
        challenge metric.

    Returns:
      GAP, a fraction in [0, 1].

    Raises:
      ValueError: a predicted id is not in `solution`, a score is NaN, or no
        solution image has ground truth.
    """
    for image_id in predictions:
        if image_id not in solution:
            raise ValueError(f"Test image {image_id!r} is not part of the solution")
    num_positives = sum(1 for labels in solution.values() if len(labels) > 0)
    if num_positives == 0:
        raise ValueError("no solution image has ground truth; GAP is undefined")
    entries = [(image_id, *_label_and_score(image_id, p)) for image_id, p in predictions.items()]
    entries.sort(key=lambda e: (-e[2], e[0]))
    total = correct = 0
    gap = 0.0
    for image_id, label, _ in entries:
        ground_truth = solution[image_id]
        if ignore_non_gt_test_images and not ground_truth:
            continue
        total += 1
        if label in ground_truth:
            correct += 1
            gap += correct / total
    return gap / num_positives


def top1_accuracy(
    predictions: Mapping[str, tuple[Label, float]], solution: Mapping[str, Sequence[Label]]
) -> float:
    """Fraction of images with ground truth whose predicted label is in it (DELF).

    Images without ground truth are not scored; images with ground truth and
    no prediction count as wrong.

    Args:
      predictions: image id -> (label, score), or {'class', 'score'}.
      solution: image id -> landmark labels; empty for non-landmark images.

    Returns:
      The accuracy, a fraction in [0, 1].

    Raises:
      ValueError: a predicted id is not in `solution`, or no solution image
        has ground truth.
    """
    for image_id in predictions:
        if image_id not in solution:
            raise ValueError(f"Test image {image_id!r} is not part of the solution")
    num_gt = correct = 0
    for image_id, ground_truth in solution.items():
        if not ground_truth:
            continue
        num_gt += 1
        if image_id in predictions:
            label, _ = _label_and_score(image_id, predictions[image_id])
            correct += label in ground_truth
    if num_gt == 0:
        raise ValueError("no solution image has ground truth; top-1 accuracy is undefined")
    return correct / num_gt


def _protocol_sets(query: Mapping, protocol: str) -> tuple[np.ndarray, np.ndarray]:
    """(positives, junk) db indices of one query under a protocol."""
    easy, hard, junk = (np.asarray(query[k], dtype=np.int64).reshape(-1) for k in _GND_KEYS)
    if protocol == "easy":
        return easy, np.concatenate([junk, hard])
    if protocol == "medium":
        return np.concatenate([easy, hard]), junk
    return hard, np.concatenate([junk, easy])


def _revisited_query(
    ranking: np.ndarray, positives: np.ndarray, junk: np.ndarray, kappas: Sequence[int]
) -> tuple[float, np.ndarray]:
    """Trapezoidal AP and precisions at kappas of one query (cirtorch compute_map)."""
    if positives.size == 0:
        return math.nan, np.full(len(kappas), np.nan)
    pos = np.flatnonzero(np.isin(ranking, positives))
    junk_pos = np.flatnonzero(np.isin(ranking, junk))
    # Junk is removed from the ranking: each positive moves up by the number
    # of junk images ranked strictly before it.
    pos = pos - np.searchsorted(junk_pos, pos, side="left")
    j = np.arange(pos.size, dtype=np.float64)
    left = np.where(pos == 0, 1.0, j / np.maximum(pos, 1))
    right = (j + 1) / (pos + 1)
    # Recall steps by 1/#positives even when a truncated ranking misses some.
    ap = float(np.sum((left + right) / 2) / positives.size)
    precisions = np.zeros(len(kappas))
    if pos.size:
        pos1 = pos + 1
        for n, k in enumerate(kappas):
            # Past the last positive, precision is taken at its rank.
            kq = min(int(pos1.max()), k)
            precisions[n] = np.count_nonzero(pos1 <= kq) / kq
    return ap, precisions


def revisited_map(
    ranks: np.ndarray, gnd: Sequence[Mapping], kappas: Sequence[int] = (1, 5, 10)
) -> dict[str, dict[str, Any]]:
    """Revisited Oxford/Paris mAP and mP@k under the easy, medium and hard protocols.

    Protocols (Radenovic et al. 2018): easy counts `easy` as positive and
    ignores `junk` + `hard`; medium counts `easy` + `hard` and ignores `junk`;
    hard counts `hard` and ignores `junk` + `easy`. Ignored images are removed
    from the ranking. AP is cirtorch's trapezoidal rule: the j-th positive
    (0-based) at junk-adjusted rank r adds (j/r + (j+1)/(r+1))/2 / #positives,
    with j/r read as 1 when r = 0. P@k uses kq = min(k, 1-based rank of the
    last positive) and is (#positives ranked <= kq)/kq. A query without
    positives under a protocol gets NaN and is left out of that protocol's
    means, as cirtorch does.

    Args:
      ranks: int array [num_queries, num_db_ranked]: for each query, database
        indices best first (a full permutation, or a top-k truncation in which
        case unranked positives add nothing). Note cirtorch's `compute_map`
        takes the transpose; DELF's `ComputeMetrics` takes this layout.
      gnd: per query a mapping with 'easy', 'hard', 'junk' lists of 0-based
        database indices (the 'gnd' list of a gnd_r*.pkl; see
        revisited_gnd.read_revisited_gnd). Other keys such as 'bbx' are ignored.
      kappas: the k of mP@k, 1-based.

    Returns:
      {'easy'|'medium'|'hard': {'map': float, 'mp@k': float for each k,
      'aps': float64 [num_queries] with NaN for excluded queries}}. Fractions;
      papers report them x100. A protocol under which every query is excluded
      has NaN means.

    Raises:
      ValueError: `ranks` is not a 2-D integer array with one row per gnd
        entry, a row holds a negative or repeated index, a gnd entry lacks a
        key, or a kappa is not a positive integer.
    """
    ranks = np.asarray(ranks)
    if ranks.ndim != 2 or not np.issubdtype(ranks.dtype, np.integer):
        raise ValueError(
            f"ranks must be a 2-D integer array [num_queries, num_db], got "
            f"shape {ranks.shape} dtype {ranks.dtype}"
        )
    if ranks.shape[0] != len(gnd):
        raise ValueError(
            f"ranks has {ranks.shape[0]} rows but gnd has {len(gnd)} queries; ranks must be "
            "[num_queries, num_db] (cirtorch's compute_map takes the transpose)"
        )
    if ranks.size and ranks.min() < 0:
        raise ValueError("ranks holds negative database indices")
    # A repeated index would count a positive twice and inflate AP silently.
    sorted_rows = np.sort(ranks, axis=1)
    repeated = np.flatnonzero(np.any(sorted_rows[:, 1:] == sorted_rows[:, :-1], axis=1))
    if repeated.size:
        raise ValueError(f"ranks row {int(repeated[0])} repeats a database index")
    for k in kappas:
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"kappas must be positive integers, got {list(kappas)}")
    for i, query in enumerate(gnd):
        missing = [key for key in _GND_KEYS if key not in query]
        if missing:
            raise ValueError(f"gnd[{i}] lacks {missing}; expected keys {list(_GND_KEYS)}")

    results: dict[str, dict[str, Any]] = {}
    for protocol in _PROTOCOLS:
        aps = np.empty(len(gnd))
        precisions = np.empty((len(gnd), len(kappas)))
        for i, query in enumerate(gnd):
            positives, junk = _protocol_sets(query, protocol)
            aps[i], precisions[i] = _revisited_query(ranks[i], positives, junk, kappas)
        scored = ~np.isnan(aps)
        num_scored = int(np.count_nonzero(scored))
        entry: dict[str, Any] = {
            "map": float(np.mean(aps[scored])) if num_scored else math.nan,
        }
        for n, k in enumerate(kappas):
            entry[f"mp@{k}"] = float(np.mean(precisions[scored, n])) if num_scored else math.nan
        entry["aps"] = aps
        results[protocol] = entry
    return results
