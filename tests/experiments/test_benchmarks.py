"""Every benchmark script runs in its small mode and writes its table; its
numbers are checked against what the shapes and the definitions imply."""

import json
import os
import sys

import numpy as np
import pytest
from configs_for_tests import REPO

sys.path.insert(0, os.path.join(REPO, "experiments", "benchmarks"))

import bench_report  # noqa: E402


def _written(tmp_path, name: str) -> dict:
    payload = json.load(open(tmp_path / f"{name}.json"))
    assert payload["machine"]["device_count"] == 8
    assert payload["benchmark"] == name
    return payload


def test_format_table_aligns_columns_and_marks_missing_cells():
    table = bench_report.format_table([{"a": 1.23456, "b": "x"}, {"a": 10, "b": None}], ["a", "b"])
    assert table.splitlines() == ["a      b", "-----  -", "1.235  x", "10     -"]
    assert bench_report.format_table([], ["ab"]).splitlines() == ["ab", "--"]
    markdown = bench_report.markdown_table([{"a": 12345.6, "b": 0.98765}], ["a", "b", "c"])
    assert markdown.splitlines() == ["| a | b | c |", "|---|---|---|", "| 12,346 | 0.988 | - |"]


def test_report_prints_every_table_with_every_column(tmp_path, capsys):
    payload = {
        "benchmark": "b",
        "command": "python b.py",
        "machine": {"device_kind": "cpu", "device_count": 1},
        "rows": [{"x": 1, "y": 2}],
        "columns": ["x"],
        # A column only later rows have, and a table with its own column list.
        "stage_rows": [{"stage": "a"}, {"stage": "b", "diff": 0.5}],
        "head_rows": [{"p": 1, "q": 2}],
        "head_columns": ["q"],
    }
    path = tmp_path / "b.json"
    path.write_text(json.dumps(payload))
    bench_report.main([str(path)])
    out = capsys.readouterr().out
    assert "| x |\n|---|\n| 1 |" in out
    assert "| stage | diff |\n|---|---|\n| a | - |\n| b | 0.5 |" in out
    assert "| q |\n|---|\n| 2 |" in out


@pytest.mark.e2e
def test_train_step_small(tmp_path):
    import train_step

    payload = train_step.main(
        [
            "--mode=small",
            "--rows=resnet_tiny_32",
            # The demo data's 10 classes in float32 with XLA's convolutions:
            # the program of the trained_demo fixture's smoke run
            # (conftest.py), compiled once for both.
            "--num_classes=10",
            "--dtype=float32",
            "--conv_lowering=xla",
            "--iterations=1",
            "--repeats=1",
            f"--output_dir={tmp_path}",
        ]
    )
    assert _written(tmp_path, "train_step")["rows"] == payload["rows"]
    (row,) = payload["rows"]
    assert row["project_img_s"] > 0 and row["bare_img_s"] > 0
    assert row["project_vs_bare"] == pytest.approx(row["project_img_s"] / row["bare_img_s"])
    assert row["tflop_s_per_device"] > 0  # XLA's cost analysis of the real step
    with pytest.raises(SystemExit):
        train_step.main(["--mode=small", "--rows=b7_512"])  # a full-mode row


@pytest.mark.e2e
def test_step_memory_small_head_split_and_remat(tmp_path, monkeypatch):
    """The script's head table, compiled, and its remat table, whose remat
    step's bytes are given by hand (model.remat='blocks' is tested in
    tests/models/test_create_model.py; one more compile here would add 7 s);
    its largest-batch table (two to four more compiles of the same step) is
    tested below on memory figures given by hand."""
    import step_memory

    compiled_bytes = step_memory.compiled_bytes

    def remat_by_hand(row, mesh, num_classes, dtype, remat="none", **head):
        got = compiled_bytes(row, mesh, num_classes, dtype, **head)
        if remat == "blocks":  # the plain step's, a quarter of its temporaries saved
            saved = got["temp"] // 4
            got = {**got, "temp": got["temp"] - saved, "peak": got["peak"] - saved}
        return got

    monkeypatch.setattr(step_memory, "compiled_bytes", remat_by_hand)
    payload = step_memory.main(["--mode=small", "--tables=head,remat", f"--output_dir={tmp_path}"])
    _written(tmp_path, "step_memory")
    split, whole = payload["head_rows"]
    assert split["head_split"] and not whole["head_split"]
    # The head's kernel (203,094 classes padded to a multiple of 8 x 3
    # sub-centers x 64 dims, float32) and the optimizer's momentum: split
    # over 8 devices, 7/8 of them leave each device's arguments.
    classes = -(-203_094 // 8) * 8
    head_bytes = classes * 3 * 64 * 4 * 2  # kernel + SGD momentum
    saved = (whole["argument_gib"] - split["argument_gib"]) * (1 << 30)
    assert saved == pytest.approx(head_bytes * 7 / 8, rel=0.02)
    # The same step with and without model.remat='blocks', the saving its row's;
    # 'none' is the head table's split step, measured once.
    plain, remat = payload["remat_rows"]
    assert (plain["remat"], remat["remat"]) == ("none", "blocks")
    assert plain["peak_gib"] == split["peak_gib"]
    assert remat["saved_fraction"] == pytest.approx(1 - remat["peak_gib"] / plain["peak_gib"])
    assert remat["temp_gib"] == pytest.approx(0.75 * plain["temp_gib"], rel=1e-6)
    assert payload["rows"] == []  # no max_batch table asked for


def test_max_batch_rows_from_the_compiled_peaks(monkeypatch):
    """The largest-batch table of the memory the compiled steps report (here
    100 MiB fixed + 10 MiB per image on each device, 8 devices)."""
    import step_memory
    from train_step import Row

    mib = 1 << 20
    asked = []

    def compiled_bytes(row, mesh, num_classes, dtype, **head):
        asked.append((row.batch_size, num_classes, dtype, head))
        return {"peak": 100 * mib + 10 * mib * row.batch_size // 8}

    class Mesh:
        devices = np.zeros(8)

    monkeypatch.setattr(step_memory, "compiled_bytes", compiled_bytes)
    row = Row("demo.py:smoke", "resnet_tiny", 32, 16, None)
    rows = step_memory.max_batch_rows(
        row, Mesh(), 1000, "bfloat16", (0.25, 1.0), shard_classes=True
    )
    # 0.25 GiB = 256 MiB: (256 - 100) / 10 = 15 images; 1 GiB: 92.
    assert [r["max_batch_per_device"] for r in rows] == [15, 92]
    for r, budget in zip(rows, (0.25, 1.0), strict=True):
        assert r["budget_gib"] == budget and r["peak_at_max_gib"] * 1024 <= budget * 1024
        assert r["per_image_mib"] == pytest.approx(10)
        assert r["fixed_gib"] * 1024 == pytest.approx(100)
    assert rows[0]["compiles"] == 3 and rows[1]["compiles"] == 4  # batches 2, 4 shared
    # Global batches (per device x 8) of the row's step, with its head keys.
    assert [a[0] for a in asked] == [16, 32, 120, 736]
    assert {(a[1], a[2], tuple(a[3].items())) for a in asked} == {
        (1000, "bfloat16", (("shard_classes", True),))
    }


@pytest.mark.e2e
def test_rerank_cost_small_times_each_step_beside_the_first_search(tmp_path):
    import rerank_cost

    payload = rerank_cost.main(["--mode=small", f"--output_dir={tmp_path}"])
    _written(tmp_path, "rerank_cost")
    rows = payload["rows"]
    assert [r["step"] for r in rows] == ["first stage kNN", *rerank_cost.STEPS]
    for row in rows:
        assert (row["index_rows"], row["dim"], row["queries"]) == (2_000, 16, 20)
        assert row["seconds"] > 0 and row["first_stage_seconds"] > 0
        assert row["rss_extra_gib"] is None  # one process: no row's own resident peak
    # The first search's distances alone ([20, 100] float32) are traced.
    assert all(r["numpy_peak_gib"] * (1 << 30) >= 20 * 100 * 4 for r in rows)
    # SuperGlobal gathers its queries' 400 candidates on the host ([24, 400,
    # 16] float32: 20 queries padded to the 8 devices); their [400, 400]
    # similarities are the devices' (host float64 would be 25.6 MB).
    superglobal = rows[3]
    peak = superglobal["numpy_peak_gib"] * (1 << 30)
    assert 24 * 400 * 16 * 4 <= peak < 20 * 400 * 400 * 8


def test_rerank_cost_chosen_steps_and_the_self_search_rate(tmp_path):
    """--step picks the rows; --self_search_sample adds the index's
    self-search rate on a sample, scaled to every row of the index."""
    import rerank_cost

    payload = rerank_cost.main(
        [
            "--mode=small",
            "--step=alpha_qe(n=2, alpha=3)",
            "--self_search_sample=500",
            f"--output_dir={tmp_path}",
        ]
    )
    rows = payload["rows"]
    assert [r["step"] for r in rows[:2]] == ["first stage kNN", "alpha_qe(n=2, alpha=3)"]
    rate = rows[2]
    assert rate["step"] == "index self-search, 500 of 2,000 rows (k=21)"
    assert rate["queries"] == 500 and rate["backend"] == "exact"
    assert rate["self_search_all_rows_seconds"] == pytest.approx(4 * rate["seconds"])
    with pytest.raises(ValueError, match="unknown step 'diffusion'"):
        rerank_cost.main(["--mode=small", "--step=diffusion(n=1, alpha=3)"])


def test_cpu_memory_schedule_shows_what_jax_checkpoint_saves():
    """step_memory's CPU compile options keep jax.checkpoint's recomputation
    in the backward pass, where XLA's CPU defaults merge it into the forward
    (the same temporaries with and without it). A chain of 8 blocks of three
    tanh(x @ w) layers on [1024, 256] float32 rows (1 MiB per activation):
    plain, the backward holds the 24 layers' outputs; checkpointed, the 8
    block inputs and one block's recomputation."""
    import jax
    import jax.numpy as jnp
    import step_memory

    def block(x, w):
        for layer in w:
            x = jnp.tanh(x @ layer)
        return x

    def loss(block_fn):
        def f(ws, x):
            for w in ws:
                x = block_fn(x, w)
            return jnp.sum(x * x)

        return jax.jit(jax.grad(f))

    keys = jax.random.split(jax.random.key(0), 9)
    ws = [jax.random.normal(k, (3, 256, 256)) / 16 for k in keys[:8]]
    x = jax.random.normal(keys[8], (1024, 256))
    compiled = {
        name: loss(fn).lower(ws, x).compile(compiler_options=step_memory.CPU_MEMORY_SCHEDULE)
        for name, fn in (("plain", block), ("remat", jax.checkpoint(block)))
    }
    temp = {k: c.memory_analysis().temp_size_in_bytes / (1 << 20) for k, c in compiled.items()}
    assert temp["plain"] >= 20, temp  # the 24 activations (less what XLA reuses)
    assert temp["remat"] <= 0.5 * temp["plain"], temp
    # The same gradients: the options change the schedule, not the program.
    for plain, remat in zip(compiled["plain"](ws, x), compiled["remat"](ws, x), strict=True):
        np.testing.assert_allclose(plain, remat, rtol=1e-5, atol=1e-7)


def test_largest_batch_search_against_hand_computed_memory():
    import step_memory

    # 100 MB fixed + 10 MB per image up to 20 images, 15 MB per image beyond.
    def peak(b):
        calls.append(b)
        return 100 + 10 * min(b, 20) + 15 * max(b - 20, 0)

    calls = []
    # The line through 2 and 4 (120, 140 MB) predicts 30 for 400 MB, but
    # peak(30) = 450; the line through 4 and 30 (slope 310/26) predicts
    # 4 + floor(260 / 11.92) = 25 (375 MB), which fits. The largest is 26.
    assert step_memory.largest_batch_within(peak, 400)[0] == 25
    assert calls == [2, 4, 30, 25]
    calls = []
    assert step_memory.largest_batch_within(peak, 250)[0] == 15  # on the first line
    assert step_memory.largest_batch_within(peak, 50)[0] is None  # not even one image
    assert step_memory.largest_batch_within(lambda b: 100, 400)[0] is None  # no slope


@pytest.mark.e2e
def test_knn_small_numpy_exact_agrees_with_the_project_search(tmp_path):
    import knn_search

    payload = knn_search.main(["--mode=small", f"--output_dir={tmp_path}"])
    _written(tmp_path, "knn_search")
    rows = {(r["data"], r["engine"].split(" leaves")[0]): r for r in payload["rows"]}
    for data in ("random", "clustered"):
        # Two exact implementations: the same neighbours (ties aside).
        assert rows[(data, "exact (numpy)")]["recall100"] >= 0.999
        # approx_max_k is computed exactly off TPUs.
        assert rows[(data, "approx_max_k (jax, recall target 0.95)")]["recall100"] >= 0.999
        scann = rows[(data, "scann default")]
        assert 0 < scann["recall10"] <= 1 and scann["build_s"] > 0
        assert rows[(data, "exact (numpy)")]["qps_vs_numpy"] == 1.0
    # On clustered data the approximate neighbours are the right cluster's.
    exact = rows[("clustered", "exact (jax, project)")]["cluster_p100"]
    assert rows[("clustered", "scann default")]["cluster_p100"] >= 0.95 * exact


def test_knn_data_sets_are_unit_rows_with_the_asked_structure():
    import knn_search

    index, queries, index_labels, query_labels = knn_search.clustered_set(3000, 50, 16, clusters=30)
    np.testing.assert_allclose(np.linalg.norm(index, axis=1), 1.0, rtol=1e-5)
    assert queries.shape == (50, 16) and index_labels.shape == (3000,)
    # Exact search finds mostly the query's own cluster; a random ranking does not.
    nearest = np.argsort(-(queries @ index.T), axis=1)[:, :10]
    assert knn_search.same_cluster_precision(nearest, index_labels, query_labels) > 0.9
    shuffled = np.random.default_rng(0).integers(0, 3000, (50, 10))
    assert knn_search.same_cluster_precision(shuffled, index_labels, query_labels) < 0.5
    # Each query's nearest point is far closer than in structureless data.
    rindex, rqueries = knn_search.random_set(3000, 50, 16)
    assert np.max(queries @ index.T, axis=1).mean() > np.max(rqueries @ rindex.T, axis=1).mean()


@pytest.mark.e2e
def test_extraction_small(tmp_path):
    import extraction

    payload = extraction.main(["--mode=small", f"--output_dir={tmp_path}"])
    _written(tmp_path, "extraction")
    rate = {(r["size"], r["flip"], r["scales"]): r["img_s"] for r in payload["rows"]}
    assert all(v > 0 for v in rate.values())
    # Three passes (one of them larger) cost more than the single one.
    assert rate[(32, True, "1/sqrt2,1,sqrt2")] < rate[(32, True, "1")]


@pytest.mark.e2e
def test_input_pipeline_small(tmp_path):
    import input_throughput

    payload = input_throughput.main(
        ["--mode=small", "--needed_img_s=1000", f"--output_dir={tmp_path}"]
    )
    _written(tmp_path, "input_throughput")
    one = payload["rows"][0]
    assert one["threads"] == 1 and one["img_s"] > 0
    assert one["cores_for_needed"] == pytest.approx(1000 / one["img_s_per_core"])
    # The stage table: the trainer's path, its parts, and the 1/2-scale DCT
    # decode (160 x 128 JPEGs, 64 px: 1/4 would undershoot, so no such row).
    stages = {row["stage"]: row for row in payload["stage_rows"]}
    assert list(stages) == [
        "decode",
        "decode + resize",
        "decode + resize + flip + uint8 (trainer)",
        "decode at 1/2 (DCT)",
        "decode at 1/2 + resize + flip + uint8",
    ]
    assert stages["decode + resize + flip + uint8 (trainer)"]["vs_trainer"] == 1.0
    for row in stages.values():
        assert row["ms_per_image"] == pytest.approx(1000 / row["img_s_per_core"])
    # Smooth photos: the DCT-scaled decode moves pixels by a grey level or so.
    assert 0 < stages["decode at 1/2 + resize + flip + uint8"]["mean_abs_diff"] < 8
