"""k-reciprocal re-ranking against a dense reference written here.

`dense_reference` follows Zhong et al., CVPR 2017, as their released
re_ranking computes it (python-version/re_ranking_feature in
zhunzhong07/person-re-ranking), one probe at a time in float64 over the full
(Q + N)^2 distance matrix; it shares no code with retrieval/k_reciprocal.py.
"""

import numpy as np
import pytest

from landmark_jax.retrieval import k_reciprocal, knn

BACKEND = "exact"


def unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def data(seed, clustered, num_q=7, num_index=30, dim=8):
    rng = np.random.default_rng(seed)
    if not clustered:
        return unit(rng.normal(size=(num_q, dim))), unit(rng.normal(size=(num_index, dim)))
    centres = unit(rng.normal(size=(5, dim)))
    noisy = lambda n: unit(centres[rng.integers(0, 5, n)] + 0.3 * rng.normal(size=(n, dim)))
    return noisy(num_q), noisy(num_index)


def reciprocal(rank, i, k):
    """R(i, k): i's k + 1 nearest that have i among their own k + 1 nearest."""
    return [f for f in rank[i, : k + 1] if i in rank[f, : k + 1]]


def dense_reference(queries, index, k1, k2, lam):
    """final distance [Q, N] of every probe and gallery image."""
    x = np.concatenate([queries, index]).astype(np.float64)
    num_q, num_all = len(queries), len(x)
    dist = np.array([[np.sum((a - b) ** 2) for b in x] for a in x])
    dist = dist / dist.max(axis=1, keepdims=True)
    rank = np.argsort(dist, axis=1, kind="stable")
    half = int(np.around(k1 / 2))
    v = np.zeros((num_all, num_all))
    for i in range(num_all):
        r = reciprocal(rank, i, k1)
        expansion = set(r)
        for c in r:
            rc = reciprocal(rank, c, half)
            if len(set(rc) & set(r)) > 2 / 3 * len(rc):
                expansion |= set(rc)
        members = sorted(expansion)
        weight = np.exp(-dist[i, members])
        v[i, members] = weight / weight.sum()
    if k2 != 1:
        v = np.array([v[rank[i, :k2]].mean(axis=0) for i in range(num_all)])
    final = np.zeros((num_q, len(index)))
    for p in range(num_q):
        for g in range(len(index)):
            m = np.minimum(v[p], v[num_q + g]).sum()
            final[p, g] = (1 - lam) * (1 - m / (2 - m)) + lam * dist[p, num_q + g]
    return final


def first_search(queries, index, num_l):
    return knn.search(queries, index, num_l, backend=BACKEND)[1]


def rerank(queries, index, cands, k1, k2, lam, **kwargs):
    return k_reciprocal.k_reciprocal_rerank(
        queries.astype(np.float32), index.astype(np.float32), cands, k1, k2, lam, BACKEND, **kwargs
    )


def assert_matches(reference, dist, cands):
    """Every returned distance is the reference's for that pair, ascending."""
    for q in range(len(cands)):
        valid = cands[q] >= 0
        np.testing.assert_allclose(dist[q, valid], reference[q, cands[q, valid]], atol=1e-6)
        ref_in_order = reference[q, cands[q, valid]]
        # the order is the reference's; ties (within 1e-9) may swap
        assert np.all(np.diff(ref_in_order) >= -1e-9), (q, ref_in_order)


@pytest.mark.parametrize("clustered", [False, True])
@pytest.mark.parametrize("k1, k2, lam", [(20, 6, 0.3), (5, 3, 0.3), (3, 2, 0.6), (6, 1, 0.1)])
def test_all_candidates_equal_the_dense_algorithm(clustered, k1, k2, lam):
    queries, index = data(int(clustered) * 10 + k1, clustered)
    reference = dense_reference(queries, index, k1, k2, lam)
    dist, cands = rerank(queries, index, first_search(queries, index, len(index)), k1, k2, lam)
    assert cands.shape == (7, 30) and dist.dtype == np.float32
    for q in range(7):
        assert sorted(cands[q]) == list(range(30))
        np.testing.assert_allclose(dist[q], np.sort(reference[q]), atol=1e-6)
    assert_matches(reference, dist, cands)


@pytest.mark.parametrize("clustered", [False, True])
def test_fewer_candidates_get_the_dense_values(clustered):
    queries, index = data(3, clustered)
    reference = dense_reference(queries, index, 8, 4, 0.3)
    first = first_search(queries, index, 6)
    dist, cands = rerank(queries, index, first, 8, 4, 0.3)
    for q in range(7):
        assert sorted(cands[q]) == sorted(first[q])
    assert_matches(reference, dist, cands)


def test_lambda_one_keeps_the_original_order_and_k2_one_skips_expansion():
    queries, index = data(5, True)
    first = first_search(queries, index, 30)
    dist, cands = rerank(queries, index, first, 6, 4, 1.0)
    np.testing.assert_array_equal(cands, first)
    x = np.concatenate([queries, index])
    sq = ((x[:7, None] - x[None]) ** 2).sum(-1)
    normalised = sq[:, 7:] / sq.max(axis=1, keepdims=True)
    np.testing.assert_allclose(dist, np.take_along_axis(normalised, first, 1), atol=1e-6)

    with_k2_1 = dense_reference(queries, index, 6, 1, 0.3)
    assert not np.allclose(with_k2_1, dense_reference(queries, index, 6, 4, 0.3))
    assert_matches(with_k2_1, *rerank(queries, index, first, 6, 1, 0.3))


# 1-D positions on a short arc of the unit circle (chord length grows with
# the angle): y3 y2 y1 i | a b c x | z.
POSITIONS = {"i": 0.0, "y1": -1.0, "y2": -1.5, "y3": -1.8}
POSITIONS.update({"a": 1.2, "b": 1.28, "c": 1.4, "x": 1.9, "z": 10.0})


def test_hand_computed_sets_and_weights():
    names = list(POSITIONS)  # node numbers: i is the only query
    angles = 0.1 * np.array([POSITIONS[n] for n in names])
    points = np.stack([np.cos(angles), np.sin(angles)], axis=1)
    queries, index = points[:1].astype(np.float32), points[1:].astype(np.float32)
    node = {n: j for j, n in enumerate(names)}
    ids = lambda *ns: sorted(node[n] for n in ns)
    lists, maxima = k_reciprocal._neighbour_lists(
        queries, index, 7, knn.IndexSearch(index, BACKEND)
    )
    # k1 = 6: the 7 nearest. i's are all but x and z; x has i among its 7,
    # but x is not among i's, so x is not in R(i, 6).
    assert sorted(lists[node["i"]]) == ids("i", "y1", "y2", "y3", "a", "b", "c")
    assert sorted(lists[node["x"]]) == ids("x", "c", "b", "a", "i", "y1", "y2")
    r = k_reciprocal._reciprocal(lists, np.array([node["i"], node["x"]]), 7)
    assert sorted(r[0][r[0] >= 0]) == ids("i", "y1", "y2", "y3", "a", "b", "c")
    assert sorted(r[1][r[1] >= 0]) == ids("x", "a", "b", "c")
    # round(6 / 2) + 1 = 4 nearest: c's are c b a x, and each has c among its
    # own 4, so R(c, 3) = {a, b, c, x}; 3 of its 4 are in R(i, 6), 3 > 8/3.
    rc = k_reciprocal._reciprocal(lists, np.array([node["c"]]), 4)[0]
    assert sorted(rc[rc >= 0]) == ids("a", "b", "c", "x")
    star = k_reciprocal._expanded_sets(lists, np.array([node["i"]]), 6)[0]
    assert list(star[star >= 0]) == ids("i", "y1", "y2", "y3", "a", "b", "c", "x")
    # V(i) = exp(-d / max) normalised over R*(i); i's farthest node is z.
    chord = lambda n: 2 - 2 * np.cos(0.1 * (POSITIONS[n] - POSITIONS["i"]))
    assert maxima[node["i"]] == pytest.approx(chord("z"), abs=1e-6)
    members = ["i", "y1", "y2", "y3", "a", "b", "c", "x"]
    weight = {n: np.exp(-chord(n) / chord("z")) for n in members}
    indptr, cols, vals = k_reciprocal._encode(
        queries, index, lists, maxima, np.array([node["i"]]), 6
    )
    assert list(cols) == ids(*members)
    expected = [weight[names[j]] / sum(weight.values()) for j in cols]
    np.testing.assert_allclose(vals, expected, atol=1e-7)


def test_index_neighbors_cache_minus_one_candidates_and_bad_arguments():
    queries, index = data(7, True)
    first = first_search(queries, index, 12)
    first[:, -3:] = -1
    first[2, 4] = -1
    cache = knn.search(index, index, 9, backend=BACKEND)[1]
    searched = rerank(queries, index, first, 8, 3, 0.3)
    cached = rerank(queries, index, first, 8, 3, 0.3, index_neighbors=cache)
    for a, b in zip(searched, cached, strict=True):
        np.testing.assert_array_equal(a, b)
    dist, cands = searched
    assert np.all(cands[:, -3:] == -1) and np.all(np.isinf(dist[:, -3:]))
    assert np.all(cands[2, -4:] == -1) and np.all(cands[2, :-4] >= 0)
    assert_matches(dense_reference(queries, index, 8, 3, 0.3), dist, cands)

    bad = [
        (dict(k1=0), "k1"),
        (dict(k2=0), "k2"),
        (dict(lambda_value=1.5), "lambda_value"),
        (dict(backend="numpy"), "backend"),
        (dict(candidates=first[:3]), "candidates"),
        (dict(candidates=first + 30), "candidates"),
        (dict(index_neighbors=cache[:, :3]), "index_neighbors"),
        (dict(queries=2 * queries), "queries"),
        (dict(index=index[:, :4]), "dims"),
        (dict(index_search=knn.IndexSearch(index[:-1], BACKEND)), "index_search searches a"),
    ]
    args = dict(
        queries=queries, index=index, candidates=first, k1=8, k2=3, lambda_value=0.3,
        backend=BACKEND,
    )  # fmt: skip
    for change, word in bad:
        with pytest.raises(ValueError, match=word):
            k_reciprocal.k_reciprocal_rerank(**{**args, **change})


def test_farthest_point_identity_and_row_maxima():
    queries, index = data(11, False, num_q=5, num_index=40, dim=6)
    x = np.concatenate([queries, index])
    sq = ((x[:, None] - x[None]) ** 2).sum(-1)
    to_negated = ((-x[:, None] - x[None]) ** 2).sum(-1)
    # for unit vectors ||x - y||^2 + ||-x - y||^2 = 4, so the max is 4 - min
    np.testing.assert_allclose(sq.max(axis=1), 4 - to_negated.min(axis=1), atol=1e-12)
    index = index.astype(np.float32)
    searched = knn.IndexSearch(index, BACKEND)
    _, maxima = k_reciprocal._neighbour_lists(queries.astype(np.float32), index, 4, searched)
    np.testing.assert_allclose(maxima, sq.max(axis=1), atol=1e-6)
