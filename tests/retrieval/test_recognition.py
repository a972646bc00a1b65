"""Recognition from retrieval: kNN voting and classifier fusion against hand-computed values."""

import collections

import numpy as np
import pytest

from landmark_jax.retrieval import metrics, recognition, solutions


def _brute_force_vote(labels, scores, power, clf=None, q=0.0, floor=1e-8):
    """Dictionary re-implementation of the documented rule, one query at a time."""
    out_labels, out_scores = [], []
    for row in range(labels.shape[0]):
        clf_row = {} if clf is None else clf[row]
        sums = collections.defaultdict(float)
        for label, cos in zip(labels[row], scores[row], strict=True):
            if label < 0:
                continue
            c = max(clf_row.get(int(label), floor), floor)
            sums[int(label)] += max(float(cos), 0.0) ** power * c**q
        if not sums:
            out_labels.append(-1)
            out_scores.append(0.0)
            continue
        best = min(sums, key=lambda lm: (-sums[lm], lm))
        out_labels.append(best)
        out_scores.append(sums[best])
    return np.array(out_labels), np.array(out_scores)


# --------------------------------------------------------------------------
# knn_vote.


def test_power_lets_one_close_neighbour_beat_several_far_ones():
    labels = np.array([[1, 2, 2, 2, 2]])
    scores = np.array([[0.95, 0.7, 0.7, 0.7, 0.7]])
    # p=1: 0.95 against 4 * 0.7 = 2.8, the crowd wins.
    label, score = recognition.knn_vote(labels, scores, power=1.0)
    assert label.tolist() == [2]
    np.testing.assert_allclose(score, [2.8])
    # p=9: 0.95^9 = 0.630 against 4 * 0.7^9 = 0.161, the near-duplicate wins.
    label, score = recognition.knn_vote(labels, scores)
    assert label.tolist() == [1]
    np.testing.assert_allclose(score, [0.95**9])


def test_ties_go_to_the_lower_landmark_id_in_any_order():
    scores = np.array([[0.5, 0.5], [0.5, 0.5]])
    labels = np.array([[7, 3], [3, 7]])
    label, score = recognition.knn_vote(labels, scores, power=2.0)
    assert label.tolist() == [3, 3]
    np.testing.assert_allclose(score, [0.25, 0.25])


def test_negative_cosines_do_not_vote():
    # Unclipped, p=1 would give landmark 2 a sum of 0.3 - 0.9 = -0.6 < 0.2.
    labels = np.array([[1, 2, 2]])
    scores = np.array([[0.2, 0.3, -0.9]])
    label, score = recognition.knn_vote(labels, scores, power=1.0)
    assert label.tolist() == [2]
    np.testing.assert_allclose(score, [0.3])


def test_queries_without_usable_neighbours():
    labels = np.array([[-1, -1], [9, 4]])
    scores = np.array([[np.nan, 0.0], [-0.1, -0.5]])  # padded slots may hold anything
    label, score = recognition.knn_vote(labels, scores)
    assert label.tolist() == [recognition.NO_PREDICTION, 4]
    assert score.tolist() == [0.0, 0.0]


def test_knn_vote_matches_brute_force_on_random_neighbours():
    rng = np.random.default_rng(0)
    labels = rng.integers(-1, 6, size=(200, 12))
    # Multiples of 1/8 make exact ties between landmarks common, and their
    # powers and sums are exact in binary, so the summation order cannot
    # decide a tie.
    scores = rng.integers(-2, 9, size=labels.shape) / 8
    for power in (1.0, 3.0, 9.0):
        want_labels, want_scores = _brute_force_vote(labels, scores, power)
        got_labels, got_scores = recognition.knn_vote(labels, scores, power=power)
        np.testing.assert_array_equal(got_labels, want_labels)
        np.testing.assert_allclose(got_scores, want_scores, rtol=1e-12)


@pytest.mark.parametrize(
    "labels, scores, kwargs, error, match",
    [
        (np.zeros((2, 3), int), np.zeros((2, 4)), {}, ValueError, "same shape"),
        (np.zeros(3, int), np.zeros(3), {}, ValueError, "2-D"),
        (np.zeros((1, 2)), np.zeros((1, 2)), {}, TypeError, "integer"),
        (np.zeros((1, 2), int), np.zeros((1, 2), int), {}, TypeError, "floating"),
        (np.zeros((2, 2), int), np.array([[0.1, 0.2], [np.nan, 0.1]]), {}, ValueError, r"\[1\]"),
        (np.zeros((1, 2), int), np.zeros((1, 2)), {"power": 0}, ValueError, "power"),
        (np.zeros((1, 2), int), np.zeros((1, 2)), {"power": np.inf}, ValueError, "power"),
    ],
)
def test_knn_vote_rejects_bad_input(labels, scores, kwargs, error, match):
    with pytest.raises(error, match=match):
        recognition.knn_vote(labels, scores, **kwargs)


# --------------------------------------------------------------------------
# fuse_with_classifier.


def test_fusion_hand_computed():
    knn_labels = np.array([[10, 20, 20]])
    knn_scores = np.array([[0.9, 0.8, 0.8]])
    clf_labels = np.array([[20, 30]])
    clf_scores = np.array([[0.5, 0.9]])
    # Retrieval alone: 0.9^9 = 0.387 for 10 against 2 * 0.8^9 = 0.268 for 20.
    assert recognition.knn_vote(knn_labels, knn_scores)[0].tolist() == [10]
    # Fused: 10 is not in the classifier's top 2 and gets the floor 1e-8:
    # 0.9^9 * 1e-80; 20 gets 2 * 0.8^9 * 0.5^10 = 2.62e-4. Landmark 30 has no
    # neighbour and is no candidate.
    label, score = recognition.fuse_with_classifier(knn_labels, knn_scores, clf_labels, clf_scores)
    assert label.tolist() == [20]
    np.testing.assert_allclose(score, [2 * 0.8**9 * 0.5**10], rtol=1e-12)


def test_fusion_without_classifier_support_keeps_retrieval_order():
    # Neither landmark is in the classifier's list: both get the floor, so the
    # retrieval ranking decides, with a tiny but nonzero score.
    label, score = recognition.fuse_with_classifier(
        np.array([[10, 20, 20]]),
        np.array([[0.9, 0.8, 0.8]]),
        np.array([[30, 40]]),
        np.array([[0.9, 0.8]]),
    )
    assert label.tolist() == [10]
    np.testing.assert_allclose(score, [0.9**9 * 1e-80], rtol=1e-12)
    assert score[0] > 0


def test_fusion_clips_negative_logits_at_the_floor():
    # (-1.5)^10 would outweigh 0.9^10; clipped, the higher logit wins.
    label, _ = recognition.fuse_with_classifier(
        np.array([[1, 2]]), np.array([[0.8, 0.8]]), np.array([[1, 2]]), np.array([[-1.5, 0.9]])
    )
    assert label.tolist() == [2]


def test_fusion_with_zero_classifier_power_is_knn_vote():
    rng = np.random.default_rng(1)
    labels = rng.integers(-1, 5, size=(50, 8))
    scores = rng.uniform(-0.2, 1.0, size=labels.shape)
    clf_labels = rng.integers(0, 5, size=(50, 3))
    clf_scores = rng.uniform(-1, 1, size=clf_labels.shape)
    fused = recognition.fuse_with_classifier(
        labels, scores, clf_labels, clf_scores, classifier_power=0.0
    )
    voted = recognition.knn_vote(labels, scores)
    np.testing.assert_array_equal(fused[0], voted[0])
    np.testing.assert_allclose(fused[1], voted[1])


def test_fusion_matches_brute_force_on_random_input():
    rng = np.random.default_rng(2)
    labels = rng.integers(-1, 8, size=(300, 10))
    scores = rng.uniform(-0.2, 1.0, size=labels.shape)
    clf_labels = np.stack([rng.permutation(8)[:4] for _ in range(300)])
    clf_labels[::7, -1] = -1  # padded classifier slots
    clf_scores = rng.uniform(-0.5, 1.0, size=clf_labels.shape)
    clf = [
        {int(lm): float(s) for lm, s in zip(ls, ss, strict=True) if lm >= 0}
        for ls, ss in zip(clf_labels, clf_scores, strict=True)
    ]
    want_labels, want_scores = _brute_force_vote(labels, scores, 9.0, clf, q=10.0)
    recognition._FUSION_CHUNK, chunk = 64, recognition._FUSION_CHUNK  # several chunks
    try:
        got_labels, got_scores = recognition.fuse_with_classifier(
            labels, scores, clf_labels, clf_scores
        )
    finally:
        recognition._FUSION_CHUNK = chunk
    np.testing.assert_array_equal(got_labels, want_labels)
    np.testing.assert_allclose(got_scores, want_scores, rtol=1e-12)


def test_fusion_rejects_bad_input():
    labels, scores = np.zeros((2, 3), int), np.zeros((2, 3))
    with pytest.raises(ValueError, match="same queries"):
        recognition.fuse_with_classifier(labels, scores, np.zeros((3, 2), int), np.zeros((3, 2)))
    with pytest.raises(ValueError, match="classifier labels"):
        recognition.fuse_with_classifier(labels, scores, np.zeros((2, 2), int), np.zeros((2, 3)))
    with pytest.raises(ValueError, match="classifier_power"):
        recognition.fuse_with_classifier(labels, scores, labels, scores, classifier_power=-1)


# --------------------------------------------------------------------------
# Helpers around the search and the head.


def test_classifier_top_m():
    logits = np.array([[0.1, 0.8, 0.6, 0.3], [0.9, 0.2, 0.0, 0.5]])
    class_landmarks = np.array([100, 101, 102, 103])
    labels, scores = recognition.classifier_top_m(logits, class_landmarks, m=2)
    assert labels.tolist() == [[101, 102], [100, 103]]
    np.testing.assert_allclose(scores, [[0.8, 0.6], [0.9, 0.5]])
    with pytest.raises(ValueError, match="m must"):
        recognition.classifier_top_m(logits, class_landmarks, m=5)
    with pytest.raises(ValueError, match="class_landmarks"):
        recognition.classifier_top_m(logits, class_landmarks[:3])


def test_neighbor_landmarks():
    train = np.array([7, 8, 9])
    got = recognition.neighbor_landmarks(np.array([[2, 0, -1]]), train)
    assert got.tolist() == [[9, 7, -1]]
    with pytest.raises(ValueError, match="out of range"):
        recognition.neighbor_landmarks(np.array([[3]]), train)


def test_predictions_write_read_and_score(tmp_path):
    labels, scores = recognition.knn_vote(
        np.array([[1, 1], [2, 3], [-1, -1]]), np.array([[0.9, 0.8], [0.5, 0.7], [0.0, 0.0]])
    )
    predictions = recognition.recognition_predictions(["a", "b", "c"], labels, scores)
    assert predictions == {"a": (1, 0.9**9 + 0.8**9), "b": (3, 0.7**9)}
    path = str(tmp_path / "recognition_submission.csv")
    solutions.write_recognition_submission(path, predictions, all_ids=["a", "b", "c"])
    assert solutions.read_recognition_predictions(path) == predictions
    # a correct at rank 1 adds 1/1, b wrong, c (a landmark) unanswered: the sum
    # is divided by the 3 images with ground truth.
    gap = metrics.global_average_precision(predictions, {"a": [1], "b": [2], "c": [5]})
    assert gap == pytest.approx(1 / 3)


def test_recognition_predictions_rejects_bad_input():
    with pytest.raises(ValueError, match="one label"):
        recognition.recognition_predictions(["a"], np.array([1, 2]), np.array([0.1, 0.2]))
    with pytest.raises(ValueError, match="twice"):
        recognition.recognition_predictions(["a", "a"], np.array([1, -1]), np.array([0.1, 0.0]))
    with pytest.raises(ValueError, match="not finite"):
        recognition.recognition_predictions(["a"], np.array([1]), np.array([np.inf]))


@pytest.mark.parametrize(
    ("train_split", "solution", "submission", "runs"),
    [
        ("train", "", False, False),  # GLR2020's evaluation: nothing reads recognition
        ("train", "recognition_solution.csv", False, True),  # scored
        ("train", "", True, True),  # its submission asked for (GLR2021)
        ("", "recognition_solution.csv", False, False),  # recognition off altogether
    ],
)
def test_recognition_runs_only_when_scored_or_its_submission_is_asked_for(
    train_split, solution, submission, runs
):
    from landmark_jax import config_lib
    from landmark_jax.retrieval import recognition_evaluation

    config = config_lib.base_config()
    config.eval.train_split = train_split
    config.eval.recognition_solution = solution
    config.eval.recognition_submission = submission
    assert recognition_evaluation.recognition_requested(config) is runs


def test_recognition_submission_without_a_train_split_is_refused_and_recipes_say_which():
    from configs_for_tests import load_config

    from landmark_jax import config_lib
    from landmark_jax.retrieval import eval_config, recognition_evaluation

    config = config_lib.base_config()
    config.eval.recognition_submission = True
    eval_config.validate_eval_config(config)
    config.eval.train_split = ""
    with pytest.raises(
        ValueError, match=r"recognition_submission=True .*, but config.eval.train_split=''"
    ):
        eval_config.validate_eval_config(config)
    config.eval.index_split = ""
    config.eval.revisited_data_dir = "anything"  # the GLDv2 splits are off: named first
    with pytest.raises(ValueError, match=r"eval.recognition_submission needs the GLDv2 splits"):
        eval_config.validate_eval_config(config)
    # GLR2020 (retrieval) embeds no train image unless a solution scores
    # recognition; GLR2021 (recognition) writes its submission.
    assert not recognition_evaluation.recognition_requested(
        load_config("glr2020_retrieval", "notclean")
    )
    assert recognition_evaluation.recognition_requested(load_config("glr2021_dolg", "step3"))
