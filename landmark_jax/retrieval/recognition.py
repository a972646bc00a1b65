"""Recognition from retrieval: landmark labels by kNN voting, optionally fused with the classifier.

A test image is labelled from its nearest train images: every neighbour votes
for its landmark with weight max(cos, 0)^p, and the landmark with the largest
sum wins. A large power (p = 9, as in the GLR2020 3rd-place recognition
notebook the GLR2021 winners reused) makes one near-duplicate outvote many
loosely similar images, which is what matters on GLDv2, where the train set
holds near-duplicates of most test landmarks and a lot of clutter.

The fusion multiplies each neighbour's vote by the classifier head's score for
the neighbour's landmark raised to a power q (q = 10 in the reference):

    score(l) = sum over neighbours n with landmark l of
               max(cos_n, 0)^p * max(clf(l), floor)^q

so a landmark wins only when retrieval and classifier agree. Only landmarks
found among the neighbours are candidates, as in the reference.

Everything here works on precomputed search results (landmark ids and cosine
similarities, best first or in any order), so it does not care whether ScaNN
or exact search produced them. Label -1 marks "no neighbour" (a padded slot,
e.g. when the train set has fewer than k images) and is ignored. Pure numpy.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence

import numpy as np

# A query with no usable neighbour gets this label and score 0;
# recognition_predictions leaves it out (an empty submission field).
NO_PREDICTION = -1

# The reference gives a landmark the classifier did not rank in its top m the
# score 1e-8, so that (1e-8)^10 keeps it a candidate far behind any landmark
# the classifier does rank.
CLASSIFIER_FLOOR = 1e-8

# Rows per chunk when matching neighbours against the classifier's top m:
# bounds the [rows, k, m] comparison to a few tens of MB.
_FUSION_CHUNK = 4096


def _check_pair(labels: np.ndarray, scores: np.ndarray, what: str) -> tuple[np.ndarray, np.ndarray]:
    labels = np.asarray(labels)
    scores = np.asarray(scores)
    if labels.ndim != 2 or scores.ndim != 2:
        raise ValueError(
            f"{what} labels and scores must be 2-D [queries, k], got shapes "
            f"{labels.shape} and {scores.shape}"
        )
    if labels.shape != scores.shape:
        raise ValueError(
            f"{what} labels {labels.shape} and scores {scores.shape} must have the same shape"
        )
    if labels.dtype.kind not in "iu":
        raise TypeError(f"{what} labels must be integer landmark ids, got dtype {labels.dtype}")
    if scores.dtype.kind != "f":
        raise TypeError(f"{what} scores must be floating point, got dtype {scores.dtype}")
    valid = labels >= 0
    if not np.isfinite(scores[valid]).all():
        rows = np.unique(np.nonzero(valid & ~np.isfinite(scores))[0])
        raise ValueError(f"{what} scores are NaN or infinite in query row(s) {rows[:5].tolist()}")
    # float64: 0.3^9 * (1e-8)^10 is far below float32's smallest number.
    return labels.astype(np.int64, copy=False), scores.astype(np.float64)


def _check_power(name: str, value: float, allow_zero: bool) -> float:
    value = float(value)
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be finite and {bound}, got {value}")
    return value


def _vote(labels: np.ndarray, votes: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sums votes per (query, landmark) and picks each query's best landmark.

    Args:
      labels: [Q, k] int64 landmark ids, -1 for no neighbour.
      votes: [Q, k] float64, >= 0.

    Returns:
      (best landmark [Q], its summed vote [Q], total vote of the query [Q]);
      ties go to the lower landmark id, a row without neighbours gets -1, 0, 0.
    """
    num_queries, k = labels.shape
    best = np.full(num_queries, NO_PREDICTION, dtype=np.int64)
    best_sum = np.zeros(num_queries, dtype=np.float64)
    votes = np.where(labels >= 0, votes, 0.0)
    total = votes.sum(axis=1)
    if num_queries == 0 or k == 0:
        return best, best_sum, total
    # Sorting each row by landmark turns "sum per landmark" into sums over
    # runs of equal ids, done for all rows at once with reduceat.
    order = np.argsort(labels, axis=1, kind="stable")
    sorted_labels = np.take_along_axis(labels, order, axis=1)
    sorted_votes = np.take_along_axis(votes, order, axis=1)
    starts = np.ones_like(sorted_labels, dtype=bool)
    starts[:, 1:] = sorted_labels[:, 1:] != sorted_labels[:, :-1]
    flat_starts = np.flatnonzero(starts)
    group_sums = np.add.reduceat(sorted_votes.ravel(), flat_starts)
    group_labels = sorted_labels.ravel()[flat_starts]
    group_rows = flat_starts // k
    keep = group_labels >= 0
    group_sums, group_labels, group_rows = group_sums[keep], group_labels[keep], group_rows[keep]
    # Within a row: largest sum first, then lowest landmark id.
    pick = np.lexsort((group_labels, -group_sums, group_rows))
    first = np.ones(pick.size, dtype=bool)
    first[1:] = group_rows[pick][1:] != group_rows[pick][:-1]
    winners = pick[first]
    best[group_rows[winners]] = group_labels[winners]
    best_sum[group_rows[winners]] = group_sums[winners]
    return best, best_sum, total


def knn_vote(
    neighbor_labels: np.ndarray,
    neighbor_scores: np.ndarray,
    *,
    power: float = 9.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Labels queries by cosine-power voting of their nearest train images.

    Per query and landmark l: score(l) = sum over neighbours of l of
    max(cos, 0)^power. Neighbours with cos <= 0 do not vote (an odd power
    would otherwise make them vote against their landmark). The prediction
    is the landmark with the largest score, ties going to the lower id.

    Args:
      neighbor_labels: [Q, k] integer landmark ids of each query's train
        neighbours; -1 marks an empty slot.
      neighbor_scores: [Q, k] cosine similarities (for unit vectors,
        1 - d^2 / 2 of the squared L2 distance d^2 that kNN search returns).
      power: the exponent p (9 in the reference); must be > 0.

    Returns:
      (labels [Q] int64, scores [Q] float64): the score is the winning sum
      itself, as the reference submits it (it ranks confident near-duplicate
      matches first for GAP). A query whose neighbours are all
      empty slots gets label -1 (NO_PREDICTION) and score 0; one whose
      neighbours all have cos <= 0 gets its lowest neighbour landmark and 0.

    Raises:
      ValueError: shapes differ or are not 2-D, a score is NaN/infinite, or
        power is out of range.
      TypeError: labels are not integers or scores not floats.
    """
    labels, scores = _check_pair(neighbor_labels, neighbor_scores, "neighbor")
    power = _check_power("power", power, allow_zero=False)
    votes = np.maximum(scores, 0.0) ** power
    best, best_sum, _ = _vote(labels, votes)
    return best, best_sum


def fuse_with_classifier(
    knn_labels: np.ndarray,
    knn_scores: np.ndarray,
    classifier_labels: np.ndarray,
    classifier_scores: np.ndarray,
    *,
    knn_power: float = 9.0,
    classifier_power: float = 10.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Fuses kNN votes with the classifier head (GLR2020 3rd-place recognition post-processing).

    Per query and landmark l found among the neighbours:

        score(l) = sum over neighbours n of l of
                   max(cos_n, 0)^knn_power * max(c(l), floor)^classifier_power

    where c(l) is the classifier's score for l if l is in the query's
    classifier top m, and floor (CLASSIFIER_FLOOR) otherwise. The floor is
    > 0 so such landmarks keep their retrieval order behind the ones the
    classifier confirms. The prediction is the
    landmark with the largest score, ties going to the lower id.

    Differences from the reference notebook, on purpose:
    - The reference takes the classifier's top m after shifting the logits
      of classes outside its `pred_mask` by -1; here every class is allowed.
    - The reference raises the (possibly negative) logit to the 10th power,
      so a logit of -1.5 outweighs one of 0.9; clipping at the floor keeps
      the classifier term monotonic in the logit. A landmark outside the top
      m and one with a logit <= floor count the same.
    - Votes of neighbours with cos <= 0 are 0, as in knn_vote.

    Args:
      knn_labels, knn_scores: [Q, k] as knn_vote's neighbor_labels/scores.
      classifier_labels: [Q, m] integer landmark ids of the classifier's top m
        (-1: empty slot). A landmark listed twice uses its larger score.
      classifier_scores: [Q, m] their scores (cosine logits in the reference).
      knn_power: p, > 0 (9 in the reference).
      classifier_power: q, >= 0 (10 in the reference; 0 ignores the
        classifier and reduces to knn_vote).

    Returns:
      (labels [Q] int64, scores [Q] float64), as knn_vote.

    Raises:
      ValueError: shapes are not 2-D, disagree on Q, a score is NaN/infinite,
        or a power is out of range.
      TypeError: labels are not integers or scores not floats.
    """
    labels, scores = _check_pair(knn_labels, knn_scores, "knn")
    clf_labels, clf_scores = _check_pair(classifier_labels, classifier_scores, "classifier")
    if clf_labels.shape[0] != labels.shape[0]:
        raise ValueError(
            f"knn results have {labels.shape[0]} queries, classifier results "
            f"{clf_labels.shape[0]}; both must list the same queries in the same order"
        )
    knn_power = _check_power("knn_power", knn_power, allow_zero=False)
    classifier_power = _check_power("classifier_power", classifier_power, allow_zero=True)
    floor = CLASSIFIER_FLOOR
    clf_for_neighbor = np.full(labels.shape, floor, dtype=np.float64)
    clf_values = np.where(clf_labels >= 0, clf_scores, -np.inf)
    for start in range(0, labels.shape[0], _FUSION_CHUNK):
        rows = slice(start, start + _FUSION_CHUNK)
        # [rows, k, m]: which classifier slot (if any) names each neighbour's landmark.
        match = (labels[rows, :, None] == clf_labels[rows, None, :]) & (labels[rows, :, None] >= 0)
        matched = np.where(match, clf_values[rows, None, :], -np.inf).max(axis=2, initial=-np.inf)
        clf_for_neighbor[rows] = np.maximum(matched, floor)
    votes = np.maximum(scores, 0.0) ** knn_power * clf_for_neighbor**classifier_power
    best, best_sum, _ = _vote(labels, votes)
    return best, best_sum


def classifier_top_m(
    logits: np.ndarray,
    class_landmarks: np.ndarray,
    *,
    m: int = 5,
) -> tuple[np.ndarray, np.ndarray]:
    """The classifier's top m landmarks per query, ready for fuse_with_classifier.

    Args:
      logits: [Q, C] classifier scores over the contiguous classes 0..C-1
        (cosine logits before the softmax scale in the reference).
      class_landmarks: [C] landmark id of each class (data_format.read_label_map).
      m: how many to keep (5 in the reference); at most C.

    Returns:
      (landmark ids [Q, m] int64, scores [Q, m] float64), best first; the
      scores are the logits.

    Raises:
      ValueError: shapes disagree, m is out of range or a logit is not finite.
    """
    logits = np.asarray(logits, dtype=np.float64)
    class_landmarks = np.asarray(class_landmarks)
    if logits.ndim != 2 or class_landmarks.shape != (logits.shape[1],):
        raise ValueError(
            f"logits must be [Q, C] and class_landmarks [C]; got {logits.shape} and "
            f"{class_landmarks.shape}"
        )
    if class_landmarks.dtype.kind not in "iu":
        raise TypeError(f"class_landmarks must be integers, got dtype {class_landmarks.dtype}")
    num_classes = logits.shape[1]
    if isinstance(m, bool) or int(m) != m or not 1 <= m <= num_classes:
        raise ValueError(f"m must be an integer in [1, {num_classes}], got {m!r}")
    if not np.isfinite(logits).all():
        raise ValueError("logits hold NaN or infinite values")
    m = int(m)
    part = np.argpartition(-logits, m - 1, axis=1)[:, :m]
    part_scores = np.take_along_axis(logits, part, axis=1)
    order = np.argsort(-part_scores, axis=1, kind="stable")
    classes = np.take_along_axis(part, order, axis=1)
    return class_landmarks[classes].astype(np.int64), np.take_along_axis(part_scores, order, axis=1)


def neighbor_landmarks(neighbor_indices: np.ndarray, train_landmarks: np.ndarray) -> np.ndarray:
    """Maps kNN row indices into the train set to landmark ids.

    Args:
      neighbor_indices: [Q, k] integer rows of the train embeddings; a
        negative index marks an empty slot.
      train_landmarks: [N] landmark id of each train row.

    Returns:
      [Q, k] int64 landmark ids, -1 where the index was negative.

    Raises:
      ValueError: an index is >= N.
      TypeError: the indices or landmarks are not integers.
    """
    indices = np.asarray(neighbor_indices)
    landmarks = np.asarray(train_landmarks)
    if indices.dtype.kind not in "iu" or landmarks.dtype.kind not in "iu":
        raise TypeError(
            f"indices and landmarks must be integers, got {indices.dtype} and {landmarks.dtype}"
        )
    if landmarks.ndim != 1:
        raise ValueError(f"train_landmarks must be 1-D, got shape {landmarks.shape}")
    if indices.size and indices.max() >= landmarks.shape[0]:
        raise ValueError(
            f"neighbour index {int(indices.max())} is out of range for "
            f"{landmarks.shape[0]} train images"
        )
    valid = indices >= 0
    return np.where(valid, landmarks[np.where(valid, indices, 0)], NO_PREDICTION).astype(np.int64)


def recognition_predictions(
    query_ids: Sequence[Hashable] | np.ndarray,
    labels: np.ndarray,
    scores: np.ndarray,
) -> dict[str, tuple[int, float]]:
    """Packs predicted labels for write_recognition_submission and global_average_precision.

    Args:
      query_ids: [Q] test image ids, in the order of the rows of labels.
      labels: [Q] predicted landmark ids (-1: no prediction).
      scores: [Q] their scores.

    Returns:
      {query id (str): (landmark id, score)}; queries labelled -1 are left
      out, which both consumers read as "no prediction".

    Raises:
      ValueError: lengths differ, an id repeats, or a score is not finite.
    """
    ids = [str(i) for i in np.asarray(query_ids, dtype=object).ravel()]
    labels = np.asarray(labels)
    scores = np.asarray(scores)
    if labels.shape != (len(ids),) or scores.shape != (len(ids),):
        raise ValueError(
            f"{len(ids)} query ids but labels {labels.shape} and scores {scores.shape}; "
            "expected one label and one score per id"
        )
    if labels.dtype.kind not in "iu":
        raise TypeError(f"labels must be integer landmark ids, got dtype {labels.dtype}")
    if len(set(ids)) != len(ids):
        seen: set[str] = set()
        repeated = next(i for i in ids if i in seen or seen.add(i))
        raise ValueError(f"query id {repeated!r} appears twice")
    predictions: dict[str, tuple[int, float]] = {}
    for query_id, label, score in zip(ids, labels.tolist(), scores.tolist(), strict=True):
        if label < 0:
            continue
        if not math.isfinite(score):
            raise ValueError(f"score {score!r} of query {query_id!r} is not finite")
        predictions[query_id] = (int(label), float(score))
    return predictions
