"""The non-landmark penalty against hand-computed scores, and its effect on GAP."""

import numpy as np
import pytest

from landmark_jax.retrieval import metrics, non_landmarks, recognition


def test_votes_and_penalty_by_hand():
    cosines = np.array(
        [
            [0.5, 0.25, -0.5],  # 0.5^2 + 0.25^2 + 0 = 0.3125
            [1.0, np.nan, np.nan],  # an empty slot votes nothing: 1
            [0.0, -1.0, 0.0],  # 0
        ]
    )
    votes = non_landmarks.non_landmark_votes(cosines, power=2.0)
    np.testing.assert_allclose(votes, [0.3125, 1.0, 0.0])
    scores = np.array([2.0, 0.5, 0.1])
    penalized = non_landmarks.penalize_non_landmarks(scores, cosines, power=2.0, weight=0.5)
    np.testing.assert_allclose(penalized, [2.0 - 0.15625, 0.5 - 0.5, 0.1])
    np.testing.assert_array_equal(
        non_landmarks.penalize_non_landmarks(scores, cosines, power=2.0, weight=0.0), scores
    )


def test_penalty_reorders_a_confident_non_landmark_below_a_landmark():
    # Two test images, both predicted as landmark 7 with the same kNN cosines
    # (same score); the first also matches a known non-landmark closely.
    train_cos = np.array([[0.9, 0.8], [0.9, 0.8]])
    train_labels = np.array([[7, 7], [7, 7]])
    labels, scores = recognition.knn_vote(train_labels, train_cos, power=3.0)
    non_landmark_cos = np.array([[0.95, 0.9], [0.2, 0.1]])
    penalized = non_landmarks.penalize_non_landmarks(scores, non_landmark_cos, power=3.0)
    # By hand: 0.9^3 + 0.8^3 = 1.241; minus 0.95^3 + 0.9^3 = 1.586375 and
    # minus 0.2^3 + 0.1^3 = 0.009.
    np.testing.assert_allclose(penalized, [1.241 - 1.586375, 1.241 - 0.009])
    solution = {"distractor": [], "landmark": [7]}
    ids = ["distractor", "landmark"]
    before = recognition.recognition_predictions(ids, labels, scores)
    after = recognition.recognition_predictions(ids, labels, penalized)
    # Tied scores: GAP breaks the tie by id order ("distractor" first), 1/2;
    # with the penalty the landmark comes first: GAP 1.
    assert metrics.global_average_precision(before, solution) == pytest.approx(0.5)
    assert metrics.global_average_precision(after, solution) == pytest.approx(1.0)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(scores=np.ones(2), non_landmark_cosines=np.ones((3, 1))), "same queries"),
        (dict(scores=np.ones(1), non_landmark_cosines=np.ones(1)), "same queries|\\[queries, k\\]"),
        (dict(scores=np.ones(1), non_landmark_cosines=np.ones((1, 1)), weight=-1.0), "weight"),
        (dict(scores=np.ones(1), non_landmark_cosines=np.ones((1, 1)), power=0.0), "power"),
        (dict(scores=np.array([np.nan]), non_landmark_cosines=np.ones((1, 1))), "scores"),
        (dict(scores=np.ones(1), non_landmark_cosines=np.array([[np.inf]])), "infinite"),
    ],
)
def test_bad_input_is_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        non_landmarks.penalize_non_landmarks(**kwargs)
