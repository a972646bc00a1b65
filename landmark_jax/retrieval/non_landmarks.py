"""Recognition confidence lowered by similarity to known non-landmark images.

GAP ranks every prediction of a test set by its score, and a prediction on an
image that shows no train landmark counts as a wrong one at its rank. On
GLDv2 most test images are such images, so a confident vote on a non-landmark
pulls GAP down. The GLR2020 recognition winners (Henkel & Singer,
"Supporting large-scale image recognition with out-of-domain samples",
arXiv 2010.01650) "re-rank predictions ... utilizing similarity to
out-of-domain images": a set of known non-landmark photographs (theirs came
from the GLDv2 2019 test set) is searched like the train set, and a test
image that resembles it loses confidence. Their exact formula could not be
checked against released code (none is public for this step); the rule here
is the same idea written in the terms of recognition.knn_vote, so that both
sides are on one scale:

    score'(q) = score(q) - weight * sum over the k_nl nearest non-landmark
                                    images j of max(cos(q, j), 0)^power

where score(q) is the winning landmark's vote sum_n max(cos_n, 0)^power
over the query's train neighbours. The non-landmark set acts as one more
class that votes against the prediction: a test image whose best landmark
match is no closer than its non-landmark matches ends below the images that
are clearly landmarks. The predicted label is unchanged; only the order of
the submission by score is, which is all GAP sees.
"""

from __future__ import annotations

import math

import numpy as np


def non_landmark_votes(non_landmark_cosines: np.ndarray, *, power: float = 9.0) -> np.ndarray:
    """Each query's vote for "non-landmark": sum of max(cos, 0)^power.

    Args:
      non_landmark_cosines: [Q, k] cosine similarities of each query to its
        k nearest non-landmark reference images (NaN marks an empty slot,
        e.g. when the set has fewer than k images).
      power: the exponent, > 0 (recognition's eval.recognition_power).

    Returns:
      [Q] float64 votes, >= 0.

    Raises:
      ValueError: not 2-D, a cosine is infinite, or power is out of range.
    """
    cosines = np.asarray(non_landmark_cosines, dtype=np.float64)
    if cosines.ndim != 2:
        raise ValueError(f"non_landmark_cosines must be [queries, k], got shape {cosines.shape}")
    if np.isinf(cosines).any():
        raise ValueError("non_landmark_cosines hold infinite values")
    if not (math.isfinite(power) and power > 0):
        raise ValueError(f"power must be finite and > 0, got {power}")
    votes = np.where(np.isnan(cosines), 0.0, np.maximum(cosines, 0.0) ** power)
    return votes.sum(axis=1)


def penalize_non_landmarks(
    scores: np.ndarray,
    non_landmark_cosines: np.ndarray,
    *,
    power: float = 9.0,
    weight: float = 1.0,
) -> np.ndarray:
    """Recognition scores minus weight x the query's non-landmark vote.

    Args:
      scores: [Q] the predictions' scores (knn_vote's or
        fuse_with_classifier's winning sums).
      non_landmark_cosines: [Q, k] as non_landmark_votes, same query order.
      power: the vote exponent, as for the landmark votes.
      weight: how much one unit of non-landmark vote costs, >= 0 (0: no
        penalty). With classifier fusion the landmark votes carry a
        classifier factor <= 1 and the weight is on that smaller scale.

    Returns:
      [Q] float64 penalised scores (they may be negative).

    Raises:
      ValueError: shapes disagree, a value is not finite, or weight < 0.
    """
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 1 or np.asarray(non_landmark_cosines).shape[:1] != scores.shape:
        raise ValueError(
            f"scores {scores.shape} and non_landmark_cosines "
            f"{np.asarray(non_landmark_cosines).shape} must list the same queries"
        )
    if not np.isfinite(scores).all():
        raise ValueError("scores hold NaN or infinite values")
    if not (math.isfinite(weight) and weight >= 0):
        raise ValueError(f"weight must be finite and >= 0, got {weight}")
    return scores - weight * non_landmark_votes(non_landmark_cosines, power=power)
