"""Alpha query expansion and database augmentation against the papers' equations.

The references below are written from the definitions (Radenović, Tolias,
Chum, TPAMI 2018: a vector becomes the normalised sum of itself and its n
nearest neighbours weighted by similarity^alpha; DBA does it to every index
vector with its n nearest other index vectors), one vector at a time in
numpy, not from retrieval/rerank.py.
"""

import numpy as np
import pytest

from landmark_jax.retrieval import k_reciprocal, rerank, superglobal_rerank


def unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def random_data(seed, clustered):
    rng = np.random.default_rng(seed)
    if not clustered:
        return unit(rng.normal(size=(7, 16))), unit(rng.normal(size=(60, 16)))
    centres = unit(rng.normal(size=(5, 16)))
    index = unit(centres[rng.integers(0, 5, 60)] + 0.15 * rng.normal(size=(60, 16)))
    queries = unit(centres[rng.integers(0, 5, 7)] + 0.15 * rng.normal(size=(7, 16)))
    return queries, index


def expand_one(v, pool, n, alpha, exclude=None):
    """The equation for one vector: v + sum over its n most similar pool rows
    (leaving out row `exclude`) of max(cos, 0)^alpha times the row, normalised."""
    sims = pool @ v
    order = [j for j in np.argsort(-sims, kind="stable") if j != exclude][:n]
    total = v.astype(np.float64).copy()
    for j in order:
        total += max(sims[j], 0.0) ** alpha * pool[j]
    return total / np.linalg.norm(total)


def exact_neighbours(queries, index, k):
    """(squared L2 distances, rows) of the k nearest, numpy."""
    d = ((queries[:, None, :] - index[None, :, :]) ** 2).sum(-1)
    rows = np.argsort(d, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(d, rows, axis=1), rows


@pytest.mark.parametrize("clustered", [False, True])
@pytest.mark.parametrize(("n", "alpha"), [(1, 3.0), (3, 3.0), (5, 0.0), (2, 0.5)])
def test_alpha_qe_is_the_equation(clustered, n, alpha):
    queries, index = random_data(0, clustered)
    distances, neighbors = exact_neighbours(queries, index, 10)
    got = rerank.alpha_query_expansion(
        queries, index, neighbors, distances, rerank.RerankStep("alpha_qe", n, alpha)
    )
    want = np.stack([expand_one(q, index, n, alpha) for q in queries])
    np.testing.assert_allclose(got, want, atol=1e-6)


def test_alpha_zero_is_average_query_expansion_by_hand():
    """q = (1, 0); the index's nearest two are (0.6, 0.8) and (0, 1):
    alpha = 0 averages the three: (1.6, 1.8) / |(1.6, 1.8)|; alpha = 1 weighs
    them by their cosines 0.6 and 0: (1.36, 0.48) / |.|."""
    q = np.array([[1.0, 0.0]])
    index = np.array([[0.0, 1.0], [0.6, 0.8], [-1.0, 0.0]])
    distances, neighbors = exact_neighbours(q, index, 2)
    assert neighbors.tolist() == [[1, 0]]
    for alpha, expected in [(0.0, [1.6, 1.8]), (1.0, [1.36, 0.48])]:
        got = rerank.alpha_query_expansion(
            q, index, neighbors, distances, rerank.RerankStep("alpha_qe", 2, alpha)
        )
        np.testing.assert_allclose(got[0], np.array(expected) / np.hypot(*expected), atol=1e-7)


@pytest.mark.parametrize("clustered", [False, True])
@pytest.mark.parametrize(("n", "alpha"), [(1, 3.0), (4, 3.0), (2, 0.0)])
def test_dba_is_the_equation(clustered, n, alpha):
    _, index = random_data(1, clustered)
    got = rerank.database_augmentation(index, rerank.RerankStep("dba", n, alpha), "exact")
    want = np.stack([expand_one(x, index, n, alpha, exclude=j) for j, x in enumerate(index)])
    np.testing.assert_allclose(got, want, atol=1e-6)


def test_a_duplicate_row_is_a_neighbour_not_the_row_itself():
    index = unit(np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.8, 0.6]]))
    got = rerank.database_augmentation(index, rerank.RerankStep("dba", 1, 1.0), "exact")
    # Rows 0 and 1 are each other's nearest other row: each doubles itself.
    np.testing.assert_allclose(got[:2], [[1.0, 0.0], [1.0, 0.0]], atol=1e-7)
    want = expand_one(index[3], index, 1, 1.0, exclude=3)
    np.testing.assert_allclose(got[3], want, atol=1e-6)


def test_steps_apply_in_order_and_each_search_is_reported():
    queries, index = random_data(2, True)
    steps = rerank.parse_steps(["dba(n=2, alpha=3)", "alpha_qe(n=3, alpha=3)"])
    searches = rerank.rerank_searches(queries, index, steps, 5, "exact")
    assert [r.label for r in searches] == [
        "first stage",
        "dba(n=2, alpha=3)",
        "dba(n=2, alpha=3) + alpha_qe(n=3, alpha=3)",
    ]
    augmented = np.stack([expand_one(x, index, 2, 3.0, exclude=j) for j, x in enumerate(index)])
    _, first = exact_neighbours(queries, index, 5)
    _, after_dba = exact_neighbours(queries, augmented, 5)
    expanded = np.stack([expand_one(q, augmented, 3, 3.0) for q in queries])
    _, after_qe = exact_neighbours(expanded, augmented, 5)
    for ranking, want in zip(searches, [first, after_dba, after_qe], strict=True):
        np.testing.assert_array_equal(ranking.neighbors, want)
        assert ranking.seconds >= 0.0


def test_rows_are_normalised_and_a_kept_self_search_is_used():
    """An ensemble's rows have the norm of its weights: the steps see cosines
    (the same answers as for the unit rows). DBA takes the index's self-search
    from the caller when it keeps one, and searches the augmented index itself."""
    queries, index = random_data(2, True)
    steps = rerank.parse_steps(["dba(n=2, alpha=3)", "alpha_qe(n=3, alpha=3)", "dba(n=1, alpha=0)"])
    want = rerank.rerank_searches(queries, index, steps, 5, "exact")
    asked = []

    def kept(k):
        asked.append(k)
        return exact_neighbours(index, index, 6)  # more than asked: sliced

    got = rerank.rerank_searches(1.3 * queries, 1.3 * index, steps, 5, "exact", kept)
    assert asked == [3]  # the first dba's n + 1; the second dba's index is augmented
    for a, b in zip(got, want, strict=True):
        np.testing.assert_array_equal(a.neighbors, b.neighbors)
        np.testing.assert_allclose(a.distances, b.distances, atol=1e-5)


def superglobal_one(q, index, ranked, m, k, beta):
    """SuperGlobal's re-ranking of one query, as its released code defines it
    (MDescAug, RerankwMDA): each of the top m candidates becomes the mean of
    itself (weight 1) and its k nearest fellow candidates (weight beta x
    similarity); candidates ordered by q . mean; the refined query is the
    element-wise max of the first k + 1 means; score (q . mean + q' . mean) / 2."""
    ids = ranked[:m]
    cands = index[ids]
    means = []
    for c in cands:
        s = cands @ c
        nearest = np.argsort(-s, kind="stable")[: k + 1]
        w = beta * s[nearest]
        w[0] = 1.0
        means.append((w[:, None] * cands[nearest]).sum(0) / w.sum())
    means = np.array(means)
    first = means @ q
    by_first = np.argsort(-first, kind="stable")
    refined = means[by_first[: k + 1]].max(axis=0)
    final = (first[by_first] + means[by_first] @ refined) / 2.0
    by_final = np.argsort(-final, kind="stable")
    return list(ids[by_first][by_final]) + list(ranked[m:]), np.sort(final)[::-1]


@pytest.mark.parametrize("clustered", [False, True])
@pytest.mark.parametrize(("m", "k", "beta"), [(20, 9, 0.15), (8, 3, 0.5), (30, 1, 0.15)])
def test_superglobal_is_its_released_code_s_definition(clustered, m, k, beta):
    queries, index = random_data(3, clustered)
    found, ranked = exact_neighbours(queries, index, 30)
    scores, got = superglobal_rerank.superglobal_rerank(queries, index, ranked, m, k, beta)
    # The candidates below m scored from the search's distances instead: the same.
    from_distances = superglobal_rerank.superglobal_rerank(
        queries, index, ranked, m, k, beta, found
    )
    np.testing.assert_array_equal(from_distances[1], got)
    np.testing.assert_allclose(from_distances[0], scores, atol=1e-9)
    for q, row, row_scores, got_row in zip(queries, ranked, scores, got, strict=True):
        want, want_scores = superglobal_one(q, index, row, m, k, beta)
        assert list(got_row) == want
        # float32 on the device (the released code's torch float32).
        np.testing.assert_allclose(row_scores[:m], want_scores, atol=1e-6)
    steps = rerank.parse_steps([f"superglobal(m={m}, k={k}, beta={beta})"])
    searches = rerank.rerank_searches(queries, index, steps, 10, "exact")
    assert searches[-1].label == f"superglobal(m={m}, k={k}, beta={beta:g})"
    np.testing.assert_array_equal(searches[-1].neighbors, got[:, :10])


def test_k_reciprocal_re_orders_the_candidates_before_it():
    """k_reciprocal(k1, k2, lambda) re-orders the ranking before it as
    k_reciprocal.k_reciprocal_rerank does (tested against its dense definition
    in test_k_reciprocal.py); each candidate keeps its distance, so the
    alpha_qe after it weighs its neighbours by their true similarities."""
    queries, index = random_data(4, True)
    steps = rerank.parse_steps(["k_reciprocal(k1=5, k2=3, lambda=0.3)", "alpha_qe(n=2, alpha=3)"])
    assert steps[0] == rerank.RerankStep("k_reciprocal", k1=5, k2=3, lambda_value=0.3)
    first, after, expanded = rerank.rerank_searches(queries, index, steps, 8, "exact")
    assert after.label == "k_reciprocal(k1=5, k2=3, lambda=0.3)"
    _, want = k_reciprocal.k_reciprocal_rerank(queries, index, first.neighbors, 5, 3, 0.3, "exact")
    np.testing.assert_array_equal(after.neighbors, want)
    assert not np.array_equal(after.neighbors, first.neighbors)  # the check can fail
    full = ((queries[:, None] - index[None]) ** 2).sum(-1)
    np.testing.assert_allclose(
        after.distances, np.take_along_axis(full, after.neighbors, 1), atol=1e-5
    )
    # alpha_qe over the re-ordered list's first two, weighted by their cosines.
    again = []
    for q, row in zip(queries, after.neighbors, strict=True):
        total = q.astype(np.float64) + sum(max(index[j] @ q, 0.0) ** 3 * index[j] for j in row[:2])
        again.append(total / np.linalg.norm(total))
    _, want = exact_neighbours(np.array(again), index, 8)
    np.testing.assert_array_equal(expanded.neighbors, want)


def test_one_scann_build_per_index_and_the_answers_of_exact_search(monkeypatch):
    """With ScaNN, rerank_searches builds one searcher per index it searches:
    the given one (first stage, DBA's self-search), the augmented one (its
    searches, alpha_qe's, superglobal's, k-reciprocal's) and the queries (k-reciprocal's
    node lists); on 60 rows ScaNN searches by brute force, so every ranking
    is exact search's."""
    from landmark_jax.retrieval import knn

    # An install requirement (setup.py): its absence is a broken install
    # (e.g. TF 2.21's ABI), which must fail here, not skip.
    assert knn.scann_available(), "ScaNN (setup.py's scann==1.4.2) cannot be imported"
    queries, index = random_data(5, True)
    steps = rerank.parse_steps(
        [
            "dba(n=2, alpha=3)",
            "alpha_qe(n=2, alpha=3)",
            "superglobal(m=20, k=3, beta=0.15)",
            "k_reciprocal(k1=5, k2=3, lambda=0.3)",
        ]
    )
    want = rerank.rerank_searches(queries, index, steps, 8, "exact")
    built = []
    build = knn.ScannSearcher.build

    def counted(points, **kwargs):
        built.append(len(points))
        return build(points, **kwargs)

    monkeypatch.setattr(knn.ScannSearcher, "build", counted)
    got = rerank.rerank_searches(queries, index, steps, 8, "scann")
    assert built == [60, 60, 7]
    for a, b in zip(got, want, strict=True):
        np.testing.assert_array_equal(a.neighbors, b.neighbors)
        np.testing.assert_allclose(a.distances, b.distances, atol=1e-5)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (
            "diffusion(n=2, alpha=3)",
            r"unknown step 'diffusion'; "
            r"valid: \('alpha_qe', 'dba', 'superglobal', 'k_reciprocal'\)",
        ),
        ("alpha_qe(n=2)", r"needs exactly n=, alpha="),
        ("alpha_qe(n=2, alpha=3, k=1)", r"needs exactly n=, alpha="),
        ("dba(n=0, alpha=3)", r"n must be an integer >= 1"),
        ("dba(n=1.5, alpha=3)", r"n must be an integer >= 1"),
        ("dba(n=1, alpha=-1)", r"alpha must be >= 0"),
        ("superglobal(m=10, k=10, beta=0.15)", r"k must be below m"),
        ("superglobal(m=10, k=2)", r"needs exactly m=, k=, beta="),
        ("k_reciprocal(k1=20, k2=6, lambda=1.5)", r"lambda must be within \[0, 1\]"),
        ("k_reciprocal(k1=0, k2=6, lambda=0.3)", r"k1 must be an integer >= 1"),
        ("k_reciprocal(k1=20, k2=6)", r"needs exactly k1=, k2=, lambda="),
        ("dba n=1", r"expected NAME\(KEY=NUMBER, ...\)"),
        ("dba(n=one, alpha=3)", r"'n=one' is not KEY=NUMBER"),
    ],
)
def test_bad_steps_are_named(spec, message):
    with pytest.raises(ValueError, match=message):
        rerank.parse_steps([spec])
    with pytest.raises(ValueError, match="a list of steps"):
        rerank.parse_steps("dba(n=1, alpha=3)")
