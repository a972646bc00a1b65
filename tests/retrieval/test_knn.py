"""kNN search: exact search against a numpy reference, ScaNN recall, dispatch."""

import logging

import numpy as np
import pytest

from landmark_jax.retrieval import exact_search, knn


def test_scann_imports():
    """ScaNN is an install requirement (setup.py pins scann==1.4.2 with
    tensorflow-cpu~=2.20.0): a failure to import it is a broken install (TF
    2.21's ABI crashes it), so the ScaNN tests below fail, never skip."""
    assert knn.scann_available(), knn._import_error_message(knn._scann_module())


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _reference(queries: np.ndarray, index: np.ndarray, k: int):
    """Brute-force squared L2 in float64, stable sort: lower index first on ties."""
    q, x = queries.astype(np.float64), index.astype(np.float64)
    d = (q * q).sum(1)[:, None] + (x * x).sum(1)[None, :] - 2 * q @ x.T
    ids = np.argsort(d, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(d, ids, axis=1), ids


@pytest.fixture(scope="module")
def unit_data():
    """Random unit vectors at the ScaNN recall test's scale (N=20,000, D=64)."""
    rng = np.random.default_rng(0)
    index = _unit(rng.standard_normal((20_000, 64)))
    queries = _unit(rng.standard_normal((200, 64)))
    return queries, index, exact_search.exact_search(queries, index, 100)


@pytest.mark.parametrize(
    "num_points, index_chunk, query_chunk",
    [
        (1000, 1000, 1024),  # one chunk each way
        (1000, 300, 16),  # chunks divide neither N=1000 nor Q=37
        (100, 7, 8),  # index chunks smaller than k
    ],
)
def test_exact_search_matches_numpy(num_points, index_chunk, query_chunk):
    rng = np.random.default_rng(num_points + index_chunk)
    # Not normalised, with an offset: the true ||q - x||^2 must come back.
    index = rng.standard_normal((num_points, 24)).astype(np.float32) + 0.5
    queries = rng.standard_normal((37, 24)).astype(np.float32) * 2
    distances, indices = exact_search.exact_search(
        queries, index, 10, index_chunk=index_chunk, query_chunk=query_chunk
    )
    ref_d, ref_i = _reference(queries, index, 10)
    assert distances.shape == indices.shape == (37, 10)
    assert distances.dtype == np.float32 and indices.dtype == np.int64
    np.testing.assert_array_equal(indices, ref_i)
    np.testing.assert_allclose(distances, ref_d, rtol=1e-5, atol=1e-5)


def test_searches_of_different_sizes_share_one_compiled_step():
    """Chunks hold a power of two of rows: 33-64 index rows and 9-16 queries
    (on 8 devices) are one program; each search is still exact."""
    rng = np.random.default_rng(4)
    before = exact_search._merge_chunk._cache_size()
    for num_points, num_queries in ((40, 9), (64, 16), (33, 11)):
        index = rng.standard_normal((num_points, 12)).astype(np.float32)
        queries = rng.standard_normal((num_queries, 12)).astype(np.float32)
        distances, indices = exact_search.exact_search(queries, index, 7)
        ref_d, ref_i = _reference(queries, index, 7)
        np.testing.assert_array_equal(indices, ref_i)
        np.testing.assert_allclose(distances, ref_d, rtol=1e-5, atol=1e-5)
    assert exact_search._merge_chunk._cache_size() - before == 1


def test_approx_max_k_backend_on_cpu_is_exact_and_validated():
    # lax.approx_max_k is TPU's approximate top-k; XLA computes it exactly on
    # CPU, so here the backend must give the reference neighbours, across
    # chunk borders and with chunks smaller than k.
    rng = np.random.default_rng(3)
    index = _unit(rng.standard_normal((500, 16)))
    queries = _unit(rng.standard_normal((9, 16)))
    ref_d, ref_i = _reference(queries, index, 20)
    for chunk in (500, 130, 12):
        distances, indices = exact_search.exact_search(
            queries, index, 20, index_chunk=chunk, recall_target=0.9
        )
        np.testing.assert_array_equal(indices, ref_i)
        np.testing.assert_allclose(distances, ref_d, atol=1e-5)
    _, indices = knn.search(queries, index, 20, backend="approx_max_k")
    np.testing.assert_array_equal(indices, ref_i)
    for bad in (0.0, 1.0, 1.5):
        with pytest.raises(ValueError, match=r"recall_target must be in \(0, 1\)"):
            exact_search.exact_search(queries, index, 20, recall_target=bad)


def test_exact_search_unit_vectors_and_ties():
    # Small integers: every dot product is exact in float32, so duplicated rows
    # tie exactly and must come back lower index first, across chunk borders.
    rng = np.random.default_rng(1)
    index = rng.integers(-2, 3, (60, 8)).astype(np.float32)
    index[[17, 33, 58]] = index[5]
    queries = np.concatenate([index[5:6], rng.integers(-2, 3, (4, 8)).astype(np.float32)])
    distances, indices = exact_search.exact_search(queries, index, 60, index_chunk=16)
    ref_d, ref_i = _reference(queries, index, 60)
    np.testing.assert_array_equal(indices, ref_i)
    np.testing.assert_array_equal(indices[0, :4], [5, 17, 33, 58])
    np.testing.assert_allclose(distances, ref_d, atol=1e-5)

    unit_index, unit_queries = _unit(index + 0.1), _unit(queries + 0.1)
    distances, _ = exact_search.exact_search(unit_queries, unit_index, 5)
    ref_d, _ = _reference(unit_queries, unit_index, 5)
    np.testing.assert_allclose(distances, ref_d, atol=1e-5)


def test_exact_search_validation():
    index = np.ones((5, 3), np.float32)
    with pytest.raises(ValueError, match=r"k=6 .*N=5"):
        exact_search.exact_search(index, index, 6)
    with pytest.raises(ValueError, match="index is empty"):
        exact_search.exact_search(index, np.zeros((0, 3), np.float32), 1)
    with pytest.raises(ValueError, match="queries is empty"):
        exact_search.exact_search(np.zeros((0, 3), np.float32), index, 1)
    with pytest.raises(ValueError, match="queries have 4 dims, the index has 3"):
        exact_search.exact_search(np.ones((2, 4), np.float32), index, 1)
    bad = index.copy()
    bad[3, 1] = np.nan
    with pytest.raises(ValueError, match="index has 1 row.* NaN .*row 3"):
        exact_search.exact_search(index, bad, 1)
    with pytest.raises(ValueError, match="2-D"):
        exact_search.exact_search(index[0], index, 1)
    with pytest.raises(ValueError, match="positive integer"):
        exact_search.exact_search(index, index, 0)


def test_recall_at_k():
    exact = np.array([[0, 1, 2, 3], [4, 5, 6, 7]])
    approx = np.array([[3, 2, 9, 8], [4, 5, 6, -1]])
    assert knn.recall_at_k(approx, exact) == pytest.approx((2 / 4 + 3 / 4) / 2)
    assert knn.recall_at_k(approx, exact, k=2) == pytest.approx((0 + 2 / 2) / 2)
    with pytest.raises(ValueError, match="same Q"):
        knn.recall_at_k(approx[:1], exact)
    with pytest.raises(ValueError, match="k=5"):
        knn.recall_at_k(approx, exact, k=5)


def test_scann_recall_on_random_unit_vectors(unit_data):
    queries, index, (_, exact) = unit_data
    searcher = knn.ScannSearcher.build(index)
    assert not searcher.brute_force
    assert (searcher.num_leaves, searcher.num_leaves_to_search, searcher.reorder_k) == (
        141,
        15,
        500,
    )
    # Random 64-d unit vectors have no cluster structure, so a query's
    # neighbours are spread over most leaves: search them all and rescore more
    # candidates. This exercises the AH scoring and reordering path end to end.
    _, approx = searcher.search(queries, leaves_to_search=141, reorder_k=1000)
    recall = knn.recall_at_k(approx, exact, 100)
    assert recall >= 0.95, recall  # measured 0.987 (seeds 0-2)


def test_scann_defaults_on_clustered_unit_vectors():
    # Embeddings of landmark classes cluster; the default 10% of leaves must
    # then find almost all neighbours.
    rng = np.random.default_rng(2)
    centres = rng.standard_normal((300, 64))
    index = _unit(centres[rng.integers(0, 300, 20_000)] + 0.35 * rng.standard_normal((20_000, 64)))
    queries = _unit(centres[rng.integers(0, 300, 200)] + 0.35 * rng.standard_normal((200, 64)))
    _, exact = exact_search.exact_search(queries, index, 100)
    _, approx = knn.ScannSearcher.build(index).search(queries)
    assert knn.recall_at_k(approx, exact) >= 0.9  # measured 0.944-0.958 (seeds 0-2)


def test_scann_brute_force_for_tiny_index_is_exact():
    rng = np.random.default_rng(3)
    index, queries = _unit(rng.standard_normal((300, 16))), _unit(rng.standard_normal((9, 16)))
    searcher = knn.ScannSearcher.build(index, num_neighbors=20)
    assert searcher.brute_force
    distances, indices = searcher.search(queries)
    ref_d, ref_i = exact_search.exact_search(queries, index, 20)
    np.testing.assert_array_equal(indices, ref_i)
    np.testing.assert_allclose(distances, ref_d, atol=1e-5)
    with pytest.raises(ValueError, match=r"k=301 .*N=300"):
        searcher.search(queries, k=301)
    # The demo's index size (about 1,100) and up to 10,000 points: brute force.
    assert knn.ScannSearcher.build(_unit(rng.standard_normal((9_999, 16)))).brute_force
    with pytest.raises(ValueError, match="queries have 8 dims, the index has 16"):
        searcher.search(queries[:, :8])


def test_scann_missing_neighbours_are_padded(caplog):
    rng = np.random.default_rng(4)
    index = rng.standard_normal((2000, 8)).astype(np.float32)
    # 200 leaves of about 10 points, one searched: far fewer than k=100 found.
    searcher = knn.ScannSearcher.build(index, num_leaves=200, num_leaves_to_search=1)
    with caplog.at_level(logging.WARNING):
        distances, indices = searcher.search(index[:5])
    assert "fewer than k=100" in caplog.text
    missing = indices < 0
    assert missing.any() and np.isinf(distances[missing]).all()
    assert np.isfinite(distances[~missing]).all() and (indices[:, 0] >= 0).all()


def test_scann_save_load_round_trip(unit_data, tmp_path):
    queries, index, _ = unit_data
    searcher = knn.ScannSearcher.build(index[:5000], num_neighbors=10)
    before = searcher.search(queries)
    searcher.save(str(tmp_path / "scann"))
    loaded = knn.ScannSearcher.load(str(tmp_path / "scann"))
    assert loaded.config == searcher.config
    after = loaded.search(queries)
    np.testing.assert_array_equal(after[1], before[1])
    np.testing.assert_array_equal(after[0], before[0])
    with pytest.raises(FileNotFoundError, match="ScannSearcher.save"):
        knn.ScannSearcher.load(str(tmp_path))


def test_search_dispatch(monkeypatch, caplog):
    rng = np.random.default_rng(5)
    index, queries = _unit(rng.standard_normal((200, 8))), _unit(rng.standard_normal((4, 8)))
    expected = exact_search.exact_search(queries, index, 5)
    np.testing.assert_array_equal(knn.search(queries, index, 5, backend="exact")[1], expected[1])
    # 200 points: the ScaNN backend builds a brute-force searcher, so exact.
    np.testing.assert_array_equal(knn.search(queries, index, 5)[1], expected[1])
    with pytest.raises(ValueError, match=r"'faiss'.*'scann', 'exact'"):
        knn.search(queries, index, 5, backend="faiss")

    # Without ScaNN: a clear ImportError, and search() falls back to exact.
    monkeypatch.setattr(knn, "_scann_module", lambda: ImportError("no module named scann"))
    assert not knn.scann_available()
    with pytest.raises(ImportError, match=r"tensorflow-cpu~=2\.20\.0 and scann==1\.4\.2"):
        knn.ScannSearcher.build(index)
    with caplog.at_level(logging.WARNING):
        result = knn.search(queries, index, 5, backend="scann")
    assert "falling back to exact search" in caplog.text.lower()
    np.testing.assert_array_equal(result[1], expected[1])


def test_index_search_builds_scann_once_and_answers_as_fresh_searches(unit_data, monkeypatch):
    """Re-ranking searches one index several times (the first stage, the
    self-search, an expansion, the farthest points): IndexSearch builds the
    tree once, and each answer is a fresh knn.search's for its own k (a
    build for k rescores max(500, 5k) candidates: 750 for k=150)."""
    queries, index, _ = unit_data
    fresh = {k: knn.search(queries, index, k) for k in (10, 150)}
    farthest = knn.search(-queries, index, 1)
    builds = []
    build = knn.ScannSearcher.build

    def counted(*args, **kwargs):
        builds.append(kwargs)
        return build(*args, **kwargs)

    monkeypatch.setattr(knn.ScannSearcher, "build", counted)
    searched = knn.IndexSearch(index)
    for k in (10, 150):
        distances, indices = searched.search(queries, k)
        np.testing.assert_array_equal(indices, fresh[k][1])
        np.testing.assert_allclose(distances, fresh[k][0], atol=1e-6)
    np.testing.assert_array_equal(searched.search(-queries, 1)[1], farthest[1])
    assert builds == [{"num_neighbors": 10}]
    # Bad queries are refused before a build; a bad backend is named.
    with pytest.raises(ValueError, match="dimension mismatch"):
        knn.IndexSearch(index).search(queries[:, :8], 10)
    assert len(builds) == 1
    with pytest.raises(ValueError, match="unknown kNN backend 'faiss'"):
        knn.IndexSearch(index, "faiss")
