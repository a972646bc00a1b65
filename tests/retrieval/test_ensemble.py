"""Ensembles: weighted concatenation of normalised embeddings, id alignment, member configs."""

import ml_collections
import numpy as np
import pytest

from landmark_jax.retrieval import ensemble
from landmark_jax.retrieval.ensemble import EnsembleMember


def _random(rng, n, d):
    return rng.normal(size=(n, d)).astype(np.float32)


# --------------------------------------------------------------------------
# combine_embeddings.


def test_combine_equals_manual_normalise_weight_concat():
    rng = np.random.default_rng(0)
    parts = [_random(rng, 6, 4), _random(rng, 6, 3), _random(rng, 6, 5)]
    weights = [1.0, 0.8, 0.5]
    combined = ensemble.combine_embeddings(parts, weights)
    manual = np.concatenate(
        [
            w * p / np.linalg.norm(p, axis=1, keepdims=True)
            for p, w in zip(parts, weights, strict=True)
        ],
        axis=1,
    )
    assert combined.dtype == np.float32
    assert combined.shape == (6, 12)
    np.testing.assert_allclose(combined, manual, rtol=1e-6, atol=1e-7)
    # Not re-normalised: every row has norm sqrt(sum w^2).
    np.testing.assert_allclose(
        np.linalg.norm(combined, axis=1), np.sqrt(sum(w * w for w in weights)), rtol=1e-6
    )


def test_squared_distance_is_weighted_sum_of_part_distances():
    rng = np.random.default_rng(1)
    weights = [w for _, w, _, _ in ensemble.GLR2020_RELEASED]
    parts = [_random(rng, 2, 8) for _ in weights]
    combined = ensemble.combine_embeddings(parts, weights).astype(np.float64)
    normalised = [p / np.linalg.norm(p, axis=1, keepdims=True) for p in parts]
    want = sum(w * w * np.sum((n[0] - n[1]) ** 2) for n, w in zip(normalised, weights, strict=True))
    got = np.sum((combined[0] - combined[1]) ** 2)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    # Equivalently 2 * sum w^2 (1 - cos_i): model i's cosine counts with w_i^2.
    cosines = [float(n[0] @ n[1]) for n in normalised]
    want_cos = 2 * sum(w * w * (1 - c) for w, c in zip(weights, cosines, strict=True))
    np.testing.assert_allclose(got, want_cos, rtol=1e-5)


def test_combine_accepts_float16_and_float64():
    rng = np.random.default_rng(3)
    parts = [_random(rng, 4, 3).astype(np.float16), _random(rng, 4, 2).astype(np.float64)]
    combined = ensemble.combine_embeddings(parts, [1.0, 2.0])
    assert combined.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(combined[:, 3:], axis=1), 2.0, rtol=1e-6)


@pytest.mark.parametrize(
    "parts, weights, error, match",
    [
        ([], [], ValueError, "at least one"),
        ([np.ones((2, 3))], [1.0, 1.0], ValueError, "2 weights"),
        ([np.ones((2, 3)), np.ones((3, 3))], [1.0, 1.0], ValueError, "model 1 has 3"),
        ([np.ones((2, 3))], [0.0], ValueError, "> 0"),
        ([np.ones((2, 3))], [-0.5], ValueError, "> 0"),
        ([np.ones((2, 3))], [float("nan")], ValueError, "finite"),
        ([np.ones((2, 3))], [True], ValueError, "number"),
        ([np.ones((2, 3), np.int32)], [1.0], TypeError, "floating"),
        ([np.ones(3)], [1.0], ValueError, "2-D"),
        ([np.array([[1.0, 0.0], [0.0, 0.0]])], [1.0], ValueError, r"row\(s\) \[1\]"),
        ([np.array([[1.0, np.nan]])], [1.0], ValueError, "not finite"),
    ],
)
def test_combine_rejects_bad_input(parts, weights, error, match):
    with pytest.raises(error, match=match):
        ensemble.combine_embeddings(parts, weights)


# --------------------------------------------------------------------------
# align_by_ids.


def test_align_reorders_to_the_first_models_ids():
    a = np.array([[1.0], [2.0], [3.0]])
    b = np.array([[30.0, 3.0], [10.0, 1.0], [20.0, 2.0]])
    ids, (aligned_a, aligned_b) = ensemble.align_by_ids(
        [(["x", "y", "z"], a), (np.array(["z", "x", "y"]), b)]
    )
    assert ids == ["x", "y", "z"]
    assert aligned_a is a  # already in order: no copy
    np.testing.assert_array_equal(aligned_b, [[10.0, 1.0], [20.0, 2.0], [30.0, 3.0]])


@pytest.mark.parametrize(
    "members, match",
    [
        ([], "at least one"),
        ([(["x", "y"], np.zeros((3, 2)))], "2 ids"),
        ([(["x", "x"], np.zeros((2, 2)))], r"\['x'\] appear more than once"),
        ([(["x", "y"], np.zeros((2, 1))), (["x", "w"], np.zeros((2, 1)))], "lacks 1.*'y'"),
        ([(["x"], np.zeros((1, 1))), (["x", "v"], np.zeros((2, 1)))], "model 0 lacks.*'v'"),
    ],
)
def test_align_errors_name_the_id(members, match):
    with pytest.raises(ValueError, match=match):
        ensemble.align_by_ids(members)


def test_align_then_combine():
    rng = np.random.default_rng(4)
    a, b = _random(rng, 5, 3), _random(rng, 5, 2)
    ids = [f"id{i}" for i in range(5)]
    perm = rng.permutation(5)
    _, aligned = ensemble.align_by_ids([(ids, a), ([ids[i] for i in perm], b[perm])])
    np.testing.assert_array_equal(
        ensemble.combine_embeddings(aligned, [1.0, 0.8]),
        ensemble.combine_embeddings([a, b], [1.0, 0.8]),
    )


# --------------------------------------------------------------------------
# Members and configs.


def test_members_from_config():
    members = ensemble.ensemble_members_from_config(
        [
            {"workdir": "runs/b7_640", "weight": 1.0, "image_size": 640},
            {"workdir": "runs/b6_640", "weight": 0.8},
            {"workdir": "runs/b7_640", "weight": 0.5, "image_size": 512},
        ]
    )
    assert members == [
        EnsembleMember("runs/b7_640", 1.0, 640),
        EnsembleMember("runs/b6_640", 0.8, None),
        EnsembleMember("runs/b7_640", 0.5, 512),
    ]


def test_members_from_config_dict():
    entry = ml_collections.ConfigDict({"workdir": "w", "weight": 2, "image_size": 512})
    assert ensemble.ensemble_members_from_config([entry]) == [EnsembleMember("w", 2.0, 512)]
    # Named members (a ConfigDict sorts its keys); an error names the member.
    named = ml_collections.ConfigDict({"b7": entry, "b6": {"workdir": "v", "weight": 0.8}})
    assert ensemble.ensemble_members_from_config(named) == [
        EnsembleMember("v", 0.8, None),
        EnsembleMember("w", 2.0, 512),
    ]
    named.b6.weight = 0.0
    with pytest.raises(ValueError, match="ensemble member 'b6': .*> 0"):
        ensemble.ensemble_members_from_config(named)


@pytest.mark.parametrize(
    "entries, match",
    [
        ([], "at least one"),
        # A dict is of named members: here the name 'workdir' maps to a string.
        ({"workdir": "w", "weight": 1.0}, "ensemble member 'workdir': expected a dict"),
        ("runs/b7", "list of member dicts"),
        (["runs/b7"], "member 0: expected a dict"),
        ([{"workdir": "w", "wieght": 1.0}], r"member 0: unknown key\(s\) \['wieght'\]"),
        ([{"workdir": "w"}], r"missing key\(s\) \['weight'\]"),
        ([{"weight": 1.0}], r"missing key\(s\) \['workdir'\]"),
        ([{"workdir": "", "weight": 1.0}], "non-empty"),
        ([{"workdir": "w", "weight": 1.0}, {"workdir": "v", "weight": 0}], "member 1.*> 0"),
        ([{"workdir": "w", "weight": "1"}], "number"),
        ([{"workdir": "w", "weight": 1.0, "image_size": 0}], "image_size"),
        ([{"workdir": "w", "weight": 1.0, "image_size": 64.0}], "image_size"),
        (
            [{"workdir": "w", "weight": 1.0}, {"workdir": "w", "weight": 0.5}],
            "member 1: 'w' at image_size None repeats ensemble member 0",
        ),
    ],
)
def test_members_from_config_errors(entries, match):
    with pytest.raises(ValueError, match=match):
        ensemble.ensemble_members_from_config(entries)


def test_released_weights_table():
    assert [w for _, w, _, _ in ensemble.GLR2020_RELEASED] == [1.0, 0.8, 0.55, 0.5]
    assert [size for _, _, size, _ in ensemble.GLR2020_RELEASED] == [640, 640, 640, 512]
    assert len({name for name, _, _, _ in ensemble.GLR2020_RELEASED}) == 4
