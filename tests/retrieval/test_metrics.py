"""Metrics on hand-made rankings with hand-computed answers.

Every expected value below is worked out in the comment next to it from the
definitions in DELF's GLDv2 metrics and cirtorch's compute_map, so a failure
points at the rule that broke.
"""

import math

import numpy as np
import pytest

from landmark_jax.retrieval import metrics

# --------------------------------------------------------------------------
# GLDv2 retrieval: mAP@100, P@k, first-hit positions.


def test_map_single_query_hand_computed():
    # Hits at ranks 1 and 3: (1/1 + 2/3) / 2.
    value = metrics.mean_average_precision({"q": ["a", "x", "b"]}, {"q": ["a", "b"]})
    assert value == pytest.approx(5 / 6)


def test_map_duplicates_are_skipped_but_consume_their_rank():
    # a at rank 2 -> 1/2; the second a (rank 3) is no hit but uses up rank 3;
    # b at rank 4 -> 2/4. AP = (1/2 + 2/4) / 2 = 0.5. Dropping the duplicate
    # would put b at rank 3 (0.5833); counting it would exceed 0.5.
    value = metrics.mean_average_precision({"q": ["x", "a", "a", "b"]}, {"q": ["a", "b"]})
    assert value == pytest.approx(0.5)


def test_map_divides_by_min_of_ground_truth_and_100():
    gt = [f"g{i}" for i in range(150)]
    # All 100 predictions right: 100/100 = 1, not 100/150.
    assert metrics.mean_average_precision({"q": gt[:100]}, {"q": gt}) == pytest.approx(1.0)
    # The first 50 right, then 50 wrong: sum of 50 ones / 100 = 0.5.
    pred = gt[:50] + [f"w{i}" for i in range(50)]
    assert metrics.mean_average_precision({"q": pred}, {"q": gt}) == pytest.approx(0.5)
    # max_predictions moves both the cutoff and the divisor: 10/10.
    assert metrics.mean_average_precision({"q": gt[:10]}, {"q": gt}, 10) == pytest.approx(1.0)


def test_map_only_first_max_predictions_count():
    pred = [f"w{i}" for i in range(100)] + ["a"]
    assert metrics.mean_average_precision({"q": pred}, {"q": ["a"]}) == 0.0
    # With a wider cutoff the hit at rank 101 counts: 1/101.
    value = metrics.mean_average_precision({"q": pred}, {"q": ["a"]}, max_predictions=101)
    assert value == pytest.approx(1 / 101)


def test_map_queries_without_prediction_count_zero():
    solution = {"q1": ["a", "b"], "q2": ["c"], "q3": ["d"], "q4": ["e"]}
    # q1 scores 5/6, the three others are not predicted: (5/6) / 4.
    value = metrics.mean_average_precision({"q1": ["a", "x", "b"]}, solution)
    assert value == pytest.approx(5 / 24)


def test_map_empty_ground_truth_scores_zero_and_counts():
    solution = {"q1": ["a"], "q2": []}
    value = metrics.mean_average_precision({"q1": ["a"], "q2": ["a"]}, solution)
    assert value == pytest.approx(0.5)


def test_map_unknown_query_raises_naming_it():
    with pytest.raises(ValueError, match="zzz"):
        metrics.mean_average_precision({"zzz": ["a"]}, {"q": ["a"]})
    with pytest.raises(ValueError, match="no queries"):
        metrics.mean_average_precision({}, {})


def test_map_rejects_string_prediction():
    with pytest.raises(TypeError, match="string"):
        metrics.mean_average_precision({"q": "a b"}, {"q": ["a"]})


def test_mean_precisions():
    solution = {"q1": ["a", "b"], "q2": ["c"]}
    # q1 hits per rank: a=1, x=0, a(dup)=0, b=1, (none)=0 -> cumsum 1,1,1,2,2
    # -> P@k = 1, 1/2, 1/3, 2/4, 2/5. q2 unpredicted -> zeros. Mean halves.
    value = metrics.mean_precisions({"q1": ["a", "x", "a", "b"]}, solution, max_predictions=5)
    np.testing.assert_allclose(value, np.array([1, 1 / 2, 1 / 3, 2 / 4, 2 / 5]) / 2)
    assert metrics.mean_precisions({}, solution).shape == (100,)


def test_mean_median_position():
    solution = {"q1": ["a"], "q2": ["b"], "q3": ["c"], "q4": ["d"]}
    predictions = {"q1": ["x", "a"], "q2": ["x", "y"], "q4": ["d"]}
    # First hits: q1 at 2, q2 none (101), q3 unpredicted (101), q4 at 1.
    mean, median = metrics.mean_median_position(predictions, solution)
    assert mean == pytest.approx((2 + 101 + 101 + 1) / 4)
    assert median == pytest.approx((2 + 101) / 2)
    with pytest.raises(ValueError, match="zzz"):
        metrics.mean_median_position({"zzz": ["a"]}, solution)


# --------------------------------------------------------------------------
# GLDv2 recognition: GAP and top-1 accuracy.

_SOLUTION = {"a": [1], "b": [2], "c": [3], "d": [], "e": [5, 6]}
_PREDICTIONS = {"a": (1, 0.9), "d": (4, 0.8), "b": (9, 0.7), "c": (3, 0.6)}


def test_gap_hand_computed():
    # Order a, d, b, c (scores). a: total 1, correct 1, +1/1. d (no GT):
    # total 2. b wrong: total 3. c: total 4, correct 2, +2/4. e has GT and no
    # prediction, so it stays in the denominator: (1 + 1/2) / 4 positives.
    value = metrics.global_average_precision(_PREDICTIONS, _SOLUTION)
    assert value == pytest.approx(1.5 / 4)


def test_gap_ignore_non_gt_test_images():
    # d is skipped: a (1/1), b wrong (total 2), c (2/3): (1 + 2/3) / 4.
    value = metrics.global_average_precision(
        _PREDICTIONS, _SOLUTION, ignore_non_gt_test_images=True
    )
    assert value == pytest.approx((1 + 2 / 3) / 4)


def test_gap_non_landmark_predictions_lower_precision():
    solution = {"a": [1], "n": []}
    predictions = {"n": (5, 0.9), "a": (1, 0.8)}
    # n first takes rank 1, a is correct at rank 2: 1/2.
    assert metrics.global_average_precision(predictions, solution) == pytest.approx(0.5)
    # Less confident on the distractor than on the landmark: no harm.
    predictions = {"n": (5, 0.1), "a": (1, 0.8)}
    assert metrics.global_average_precision(predictions, solution) == pytest.approx(1.0)


def test_gap_ties_broken_by_id_ascending():
    solution = {"a": [1], "b": [2]}
    # Equal scores: 'a' (wrong) ranks before 'b' (right) whatever the dict
    # order, so b is correct at rank 2: (1/2) / 2. The opposite order would
    # give (1/1) / 2.
    for predictions in ({"a": (9, 0.5), "b": (2, 0.5)}, {"b": (2, 0.5), "a": (9, 0.5)}):
        assert metrics.global_average_precision(predictions, solution) == pytest.approx(0.25)
    # Renaming so the right one has the smaller id flips the result.
    solution = {"a": [2], "b": [1]}
    predictions = {"b": (9, 0.5), "a": (2, 0.5)}
    assert metrics.global_average_precision(predictions, solution) == pytest.approx(0.5)


def test_gap_multi_label_ground_truth_and_delf_dict_form():
    solution = {"e": [5, 6]}
    assert metrics.global_average_precision({"e": (6, 0.3)}, solution) == 1.0
    assert metrics.global_average_precision({"e": {"class": 6, "score": 0.3}}, solution) == 1.0


def test_gap_errors():
    with pytest.raises(ValueError, match="zzz"):
        metrics.global_average_precision({"zzz": (1, 0.5)}, _SOLUTION)
    with pytest.raises(ValueError, match="NaN"):
        metrics.global_average_precision({"a": (1, math.nan)}, _SOLUTION)
    with pytest.raises(ValueError, match="ground truth"):
        metrics.global_average_precision({}, {"n": []})


def test_top1_accuracy():
    # GT images a, b, c, e: a and c right, b wrong, e unpredicted: 2/4. The
    # prediction on d (no GT) is not scored.
    assert metrics.top1_accuracy(_PREDICTIONS, _SOLUTION) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="zzz"):
        metrics.top1_accuracy({"zzz": (1, 0.5)}, _SOLUTION)
    with pytest.raises(ValueError, match="ground truth"):
        metrics.top1_accuracy({}, {"n": []})


# --------------------------------------------------------------------------
# Revisited Oxford/Paris.

# Query 0: easy [3, 7], hard [5], junk [1]. Ranking positions: 3@0, 1@1, 0@2,
# 7@3, 5@4. Query 1: no easy images, hard [2, 4], positions 2@0, 4@3.
_GND = [
    {"easy": [3, 7], "hard": [5], "junk": [1], "bbx": [0, 0, 1, 1]},
    {"easy": [], "hard": [2, 4], "junk": []},
]
_RANKS = np.array([[3, 1, 0, 7, 5, 2, 4, 6, 8, 9], [2, 0, 1, 4, 3, 5, 6, 7, 8, 9]])

# Trapezoid of one positive: j-th (0-based) at adjusted rank r, n positives.
_T = lambda j, r, n: ((1.0 if r == 0 else j / r) + (j + 1) / (r + 1)) / 2 / n

# q0 easy: ok {3, 7}, junk {1, 5}: 3 stays at 0, 7 moves 3 -> 2 (junk 1 before).
_Q0_EASY = _T(0, 0, 2) + _T(1, 2, 2)  # 19/24
# q0 medium: ok {3, 7, 5}, junk {1}: adjusted ranks 0, 2, 3.
_Q0_MEDIUM = _T(0, 0, 3) + _T(1, 2, 3) + _T(2, 3, 3)  # 55/72
# q0 hard: ok {5}, junk {1, 3, 7}: 5 moves 4 -> 1.
_Q0_HARD = _T(0, 1, 1)  # 1/4
# q1 medium and hard: ok {2, 4}, no junk: ranks 0 and 3.
_Q1 = _T(0, 0, 2) + _T(1, 3, 2)  # 17/24


def test_revisited_hand_computed():
    # The worked fractions, as a check on _T itself.
    np.testing.assert_allclose(
        [_Q0_EASY, _Q0_MEDIUM, _Q0_HARD, _Q1], [19 / 24, 55 / 72, 1 / 4, 17 / 24]
    )
    result = metrics.revisited_map(_RANKS, _GND)
    easy, medium, hard = result["easy"], result["medium"], result["hard"]
    # q1 has no easy positive: NaN, left out of the easy means.
    assert math.isnan(easy["aps"][1])
    assert easy["map"] == pytest.approx(19 / 24)
    # mP@k, kq = min(k, last positive's 1-based adjusted rank):
    # q0 easy ranks 1, 3 -> P@1 = 1, P@5 = P@10 = 2/3 (kq = 3, not 5 or 10).
    assert (easy["mp@1"], easy["mp@5"], easy["mp@10"]) == pytest.approx((1, 2 / 3, 2 / 3))
    np.testing.assert_allclose(medium["aps"], [55 / 72, 17 / 24])
    assert medium["map"] == pytest.approx((55 / 72 + 17 / 24) / 2)
    # q0 medium ranks 1, 3, 4 -> 1, 3/4, 3/4; q1 ranks 1, 4 -> 1, 2/4, 2/4.
    assert medium["mp@1"] == pytest.approx(1)
    assert medium["mp@5"] == pytest.approx((3 / 4 + 2 / 4) / 2)
    assert medium["mp@10"] == pytest.approx((3 / 4 + 2 / 4) / 2)
    # q0 hard rank 2 -> P@1 = 0, P@5 = P@10 = 1/2; q1 as medium.
    assert hard["map"] == pytest.approx((1 / 4 + 17 / 24) / 2)
    assert (hard["mp@1"], hard["mp@5"], hard["mp@10"]) == pytest.approx((1 / 2, 1 / 2, 1 / 2))


def test_revisited_trapezoid_differs_from_finite_sum():
    # q0 easy: adjusted ranks 0 and 2; the finite-sum AP would be (1/1 + 2/3)/2.
    easy = metrics.revisited_map(_RANKS[:1], _GND[:1])["easy"]
    assert easy["map"] == pytest.approx(19 / 24)
    assert easy["map"] != pytest.approx(5 / 6)


def test_revisited_junk_is_removed_from_the_ranking():
    # Without junk image 1, q0 easy keeps 7 at rank 3 (hard 5 sits after it).
    gnd = [{"easy": [3, 7], "hard": [5], "junk": []}]
    easy = metrics.revisited_map(_RANKS[:1], gnd)["easy"]
    assert easy["map"] == pytest.approx(_T(0, 0, 2) + _T(1, 3, 2))
    assert easy["map"] < _Q0_EASY


def test_revisited_truncated_ranking():
    # Top 3 only: q0 medium ranks 3 at 0 (1 is junk), 7 and 5 unranked.
    # AP = 1/3 (the recall step stays 1/#positives); P@5 uses kq = 1.
    result = metrics.revisited_map(_RANKS[:, :3], _GND, kappas=(1, 5))
    assert result["medium"]["aps"][0] == pytest.approx(1 / 3)
    assert result["hard"]["aps"][0] == 0.0  # 5 not ranked: no positive at all
    # q1: 2 at 0 -> 1/2; P@5 = 1 with kq = 1.
    assert result["medium"]["aps"][1] == pytest.approx(1 / 2)
    assert result["medium"]["mp@5"] == pytest.approx(1.0)
    assert result["hard"]["mp@5"] == pytest.approx((0 + 1) / 2)


def test_revisited_all_queries_empty_gives_nan():
    gnd = [{"easy": [], "hard": [1], "junk": []}]
    easy = metrics.revisited_map(np.array([[0, 1, 2]]), gnd)["easy"]
    assert math.isnan(easy["map"]) and math.isnan(easy["mp@1"])


@pytest.mark.parametrize(
    "ranks, gnd, match",
    [
        (_RANKS.T, _GND, "rows"),
        (_RANKS.astype(float), _GND, "integer"),
        (np.array([[0, 1, 1], [0, 1, 2]]), _GND, "repeats"),
        (np.array([[0, -1, 2], [0, 1, 2]]), _GND, "negative"),
        (_RANKS, [{"easy": [1], "hard": []}, _GND[1]], "junk"),
    ],
)
def test_revisited_rejects_bad_input(ranks, gnd, match):
    with pytest.raises(ValueError, match=match):
        metrics.revisited_map(ranks, gnd)


def test_revisited_rejects_bad_kappas():
    with pytest.raises(ValueError, match="kappas"):
        metrics.revisited_map(_RANKS, _GND, kappas=(0,))


def _reference_query(ranking, ok, junk, kappas):
    """A plain re-statement: drop junk, then integrate precision over recall."""
    if not ok:
        return math.nan, [math.nan] * len(kappas)
    ranked = [x for x in ranking if x not in set(junk)]
    is_pos = [x in set(ok) for x in ranked]
    ap, found = 0.0, 0
    for r, hit in enumerate(is_pos):
        if hit:
            before = 1.0 if r == 0 else sum(is_pos[:r]) / r
            found += 1
            after = found / (r + 1)
            ap += (before + after) / 2 / len(ok)
    last = max((r + 1 for r, hit in enumerate(is_pos) if hit), default=0)
    precisions = []
    for k in kappas:
        kq = min(last, k)
        precisions.append(sum(is_pos[:kq]) / kq if kq else 0.0)
    return ap, precisions


_LABEL_CODES = ((1, "easy"), (2, "hard"), (3, "junk"))  # 0: unrelated


@pytest.mark.parametrize("num_ranked", [40, 15])  # full permutations, top-15 truncations
def test_revisited_matches_reference_on_random_rankings(num_ranked):
    rng = np.random.default_rng(0)
    num_db, num_queries, kappas = 40, 25, (1, 5, 10)
    gnd = []
    for _ in range(num_queries):
        labels = rng.choice(4, size=num_db, p=[0.6, 0.15, 0.15, 0.1])  # none/easy/hard/junk
        if rng.random() < 0.2:
            labels[labels == 1] = 0  # some queries have no easy image
        gnd.append({key: np.flatnonzero(labels == v).tolist() for v, key in _LABEL_CODES})
    ranks = np.stack([rng.permutation(num_db)[:num_ranked] for _ in range(num_queries)])
    result = metrics.revisited_map(ranks, gnd, kappas)
    for protocol in ("easy", "medium", "hard"):
        aps, prs = [], []
        for ranking, q in zip(ranks.tolist(), gnd, strict=True):
            ok = {"easy": q["easy"], "medium": q["easy"] + q["hard"], "hard": q["hard"]}
            junk = {
                "easy": q["junk"] + q["hard"],
                "medium": q["junk"],
                "hard": q["junk"] + q["easy"],
            }
            ap, pr = _reference_query(ranking, ok[protocol], junk[protocol], kappas)
            aps.append(ap)
            prs.append(pr)
        aps, prs = np.array(aps), np.array(prs)
        np.testing.assert_allclose(result[protocol]["aps"], aps, rtol=1e-12)
        kept = ~np.isnan(aps)
        assert result[protocol]["map"] == pytest.approx(aps[kept].mean(), rel=1e-12)
        for n, k in enumerate(kappas):
            assert result[protocol][f"mp@{k}"] == pytest.approx(prs[kept, n].mean(), rel=1e-12)
    assert np.isnan(result["easy"]["aps"]).any()
