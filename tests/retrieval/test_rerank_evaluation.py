"""The index's kept self-search and the side-by-side re-ranking table."""

import numpy as np
import pytest

from landmark_jax.retrieval import knn, rerank_evaluation


def unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def exact(index, k):
    d = ((index[:, None] - index[None]) ** 2).sum(-1)
    rows = np.argsort(d, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(d, rows, axis=1), rows


def test_the_self_search_is_kept_and_reused_only_for_the_same_index(tmp_path, monkeypatch):
    index = unit(np.random.default_rng(0).normal(size=(12, 4)))
    path = str(tmp_path / "neighbours-index.npz")
    searched = []
    real_search = knn.IndexSearch.search

    def counting(self, queries, k):
        searched.append(k)
        return real_search(self, queries, k)

    monkeypatch.setattr(knn.IndexSearch, "search", counting)
    kept = rerank_evaluation.kept_index_neighbors(index, "exact", path, writes=True)
    distances, neighbors = kept(3)
    want_d, want_n = exact(index, 3)
    np.testing.assert_array_equal(neighbors, want_n)
    np.testing.assert_allclose(distances, want_d, atol=1e-5)
    assert searched == [3]
    # Fewer neighbours of the same index, in this or a later evaluation: read back.
    for again in (kept, rerank_evaluation.kept_index_neighbors(index.copy(), "exact", path, True)):
        d, n = again(2)
        np.testing.assert_array_equal(n[:, :2], want_n[:, :2])
    assert searched == [3]
    # More neighbours, another index (one row changed), another backend: searched.
    kept(4)
    changed = index.copy()
    changed[5] = unit(changed[5:6] + 0.5)[0]
    rerank_evaluation.kept_index_neighbors(changed, "exact", path, True)(2)
    assert searched == [3, 4, 2]
    # A damaged file is searched again and overwritten; nothing else is touched.
    with open(path, "wb") as f:
        f.write(b"not an npz")
    rerank_evaluation.kept_index_neighbors(index, "exact", path, True)(2)
    rerank_evaluation.kept_index_neighbors(index, "exact", path, True)(2)
    assert searched == [3, 4, 2, 2]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["neighbours-index.npz"]
    # A process that does not write leaves the file as it is.
    rerank_evaluation.kept_index_neighbors(changed, "exact", path, False)(2)
    assert searched == [3, 4, 2, 2, 2]
    rerank_evaluation.kept_index_neighbors(index, "exact", path, False)(2)
    assert searched == [3, 4, 2, 2, 2]


def test_the_table_puts_every_ranking_side_by_side():
    rows = ["first stage", "dba(n=1, alpha=3)"]
    tables = {
        "retrieval": {
            rows[0]: {"map@100": 0.05811, "seconds": 0.5},
            rows[1]: {"map@100": 0.0555, "seconds": 1.0},
        },
        "revisited": {
            label: {
                "easy": {"map": 0.5, "mp@10": 0.25},
                "medium": {"map": 0.125, "mp@10": None},
                "hard": {"map": 0.0625, "mp@10": 0.005},
                "seconds": 0.25,
            }
            for label in rows
        },
    }
    lines = rerank_evaluation.format_rerank(tables).splitlines()
    assert lines[0].split() == [
        "re-ranking",
        "mAP@100",
        "E",
        "mAP",
        "E",
        "mP@10",
        "M",
        "mAP",
        "M",
        "mP@10",
        "H",
        "mAP",
        "H",
        "mP@10",
        "seconds",
    ]
    # Each row: its mAP@100, the same Revisited cells (x100; '-' for a NaN),
    # and the seconds of every benchmark's step summed.
    revisited_cells = ["50.00", "25.00", "12.50", "-", "6.25", "0.50"]
    assert lines[1].split()[2:] == ["0.0581", *revisited_cells, "0.75"]
    assert lines[2].split()[2:] == ["0.0555", *revisited_cells, "1.25"]


def test_revisited_figures_keep_map_and_mp_at_10():
    scored = {"easy": {"map": 0.5, "mp@1": 1.0, "mp@10": 0.3, "aps": np.ones(3)}}
    assert rerank_evaluation.revisited_figures(scored) == {"easy": {"map": 0.5, "mp@10": 0.3}}
    with pytest.raises(KeyError):
        rerank_evaluation.revisited_figures({"easy": {"map": 0.5}})
