"""Extraction, kNN evaluation, ensembles and the evaluate entry point, end to end."""

import csv
import json
import logging
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from configs_for_tests import REPO, load_config, losses_of
from PIL import Image
from tfds_builds import build_tfds, tfds_order

from landmark_jax.data import data_format, input_pipeline
from landmark_jax.retrieval import (
    baselines,
    ensemble,
    evaluation,
    exact_search,
    extract,
    knn,
    metrics,
    recognition,
    rerank,
    restored_runs,
    solutions,
)
from landmark_jax.retrieval.eval_config import BASELINES
from landmark_jax.runtime import sharding
from landmark_jax.workdir import checkpointing

from cpu_devices import run_processes, subprocess_env

pytestmark = pytest.mark.e2e


def eval_config(demo, **eval_overrides):
    """The demo smoke config on the demo data, scored by its solutions, without
    the baselines (each an extraction of its own) unless a test asks for them."""
    config = load_config("demo", "smoke")
    config.data_dir = demo["full"]
    config.eval.retrieval_solution = f"{demo['raw']}/retrieval_solution.csv"
    config.eval.recognition_solution = f"{demo['raw']}/recognition_solution.csv"
    config.eval.knn_backend = "exact"
    config.eval.gallery_queries = 3
    config.eval.baselines = ()
    for key, value in eval_overrides.items():
        config.eval[key] = value
    return config


@pytest.fixture(scope="module")
def trained(trained_demo):
    return trained_demo  # the session's demo smoke run (conftest.py)


def csv_ids(path):
    with open(path) as f:
        return [row["id"] for row in csv.DictReader(f)]


def test_extraction_covers_every_id_once_with_unit_embeddings(demo, trained):
    config = eval_config(demo)
    model = restored_runs.load_trained_model(config, trained)
    emb = extract.extract(model, "index")
    # File order, as TFDS reads the build; every id of the CSV once.
    assert list(emb.ids) == tfds_order(demo["full"], "index")
    assert sorted(emb.ids) == sorted(csv_ids(f"{demo['raw']}/index.csv"))
    assert emb.embeddings.shape[0] == len(emb.ids)
    np.testing.assert_allclose(np.linalg.norm(emb.embeddings, axis=1), 1.0, rtol=1e-5)
    assert (emb.labels == -1).all()

    # Flip averaging against the definition: mean of the normalised views,
    # normalised, with the model applied here to the pipeline's images.
    flipped = extract.extract(model, "index", flip=True)
    module, variables = model.module, model.variables
    ds, _ = input_pipeline.create_eval_dataset(
        demo["full"], "index", image_size=config.image_size, local_batch_size=64
    )
    images = next(ds.as_numpy_iterator())["image"][: len(emb.ids)]

    def unit(x):
        x = np.asarray(x, np.float64)
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    # The demo searches with the pooled backbone features (model.descriptor):
    # the mean of the backbone's final map over its positions, computed here
    # from the backbone alone.
    assert config.model.descriptor == "pooled"
    # Jitted: one compile instead of the backbone's ops run one by one.
    backbone_final = jax.jit(
        lambda v, x: module.apply(v, x, method=lambda m, x: m.backbone(x)["final"])
    )
    final = backbone_final(variables, images)
    pooled = unit(np.asarray(final).mean(axis=(1, 2)))
    np.testing.assert_allclose(emb.embeddings, pooled, atol=1e-5)
    flipped_final = backbone_final(variables, images[:, :, ::-1])
    expected = unit(pooled + unit(np.asarray(flipped_final).mean(axis=(1, 2))))
    np.testing.assert_allclose(flipped.embeddings, expected, atol=1e-5)
    # descriptor='embedding': the model's own output, the neck's.
    neck = extract.extract(model, "index", descriptor="embedding")
    own = jax.jit(module.apply)(variables, images)
    np.testing.assert_allclose(neck.embeddings, unit(own), atol=1e-5)
    assert neck.embeddings.shape[1] == config.model.embedding_dim
    assert emb.embeddings.shape[1] == final.shape[-1] != config.model.embedding_dim

    scaled = extract.extract(model, "index", scales=(0.75, 1.0))
    assert list(scaled.ids) == list(emb.ids)
    np.testing.assert_allclose(np.linalg.norm(scaled.embeddings, axis=1), 1.0, rtol=1e-5)
    assert np.abs(scaled.embeddings - emb.embeddings).max() > 0

    val = extract.extract(model, "val")
    assert (val.labels >= 0).all()


def test_evaluate_writes_metrics_submissions_and_gallery(demo, trained):
    result = evaluation.evaluate(eval_config(demo, baselines=BASELINES), trained)
    out = os.path.join(trained, "eval")
    written = json.load(open(os.path.join(out, "metrics.json")))
    assert written["map@100"] == pytest.approx(result["map@100"])
    assert 0.0 <= written["map@100"] <= 1.0 and 0.0 <= written["gap"] <= 1.0

    # The baselines, scored on the same queries.
    solution = solutions.read_retrieval_solution(f"{demo['raw']}/retrieval_solution.csv")
    merged = {**solution[solutions.PUBLIC], **solution[solutions.PRIVATE]}
    assert written["retrieval_queries"] == len(merged)
    assert set(written["baselines"]) == set(BASELINES)
    index_ids = csv_ids(f"{demo['raw']}/index.csv")
    assert written["baselines"]["chance"] == pytest.approx(baselines.chance_map(merged, index_ids))
    assert all(0.0 <= v <= 1.0 for v in written["baselines"].values())

    # The metrics agree with the submission files scored independently.
    retrieval = solutions.read_retrieval_predictions(os.path.join(out, "retrieval_submission.csv"))
    assert sorted(retrieval) == sorted(csv_ids(f"{demo['raw']}/test.csv"))
    assert all(
        len(v) == min(100, len(csv_ids(f"{demo['raw']}/index.csv"))) for v in retrieval.values()
    )
    solution = solutions.read_retrieval_solution(f"{demo['raw']}/retrieval_solution.csv")
    scored = {k: v for k, v in retrieval.items() if k not in solution[solutions.IGNORED]}
    merged = {**solution[solutions.PUBLIC], **solution[solutions.PRIVATE]}
    assert metrics.mean_average_precision(scored, merged) == pytest.approx(written["map@100"])

    recognition = solutions.read_recognition_predictions(
        os.path.join(out, "recognition_submission.csv")
    )
    rec_solution = solutions.read_recognition_solution(f"{demo['raw']}/recognition_solution.csv")
    rec_merged = {**rec_solution[solutions.PUBLIC], **rec_solution[solutions.PRIVATE]}
    scored = {k: v for k, v in recognition.items() if k in rec_merged}
    assert metrics.global_average_precision(scored, rec_merged) == pytest.approx(written["gap"])

    with Image.open(os.path.join(out, "gallery.png")) as image:
        assert image.format == "PNG" and image.width > 300 and image.height > 300


def test_recognition_fused_with_the_classifier_head_and_non_landmark_penalty(demo, trained):
    # non_landmark_k unset: the non-landmark vote takes recognition_k = 20 neighbours.
    config = eval_config(
        demo,
        classifier_fusion=True,
        non_landmark_split="nonlandmark",
        non_landmark_weight=0.7,
        recognition_k=20,
    )
    assert config.eval.non_landmark_k is None
    result = evaluation.evaluate(config, trained)
    out = os.path.join(trained, "eval")
    written = solutions.read_recognition_predictions(
        os.path.join(out, "recognition_submission.csv")
    )
    # The head's top-5 landmarks, computed here with numpy from the checkpoint.
    label_map = data_format.read_label_map(demo["full"])
    test = extract.Embeddings.load(os.path.join(out, "embeddings-test-0.npz"))
    train = extract.Embeddings.load(os.path.join(out, "embeddings-train-0.npz"))
    references = extract.Embeddings.load(os.path.join(out, "embeddings-nonlandmark-0.npz"))
    assert len(references.ids) == 12
    # The search uses the pooled descriptors; the head scores the neck's
    # embeddings of the same images.
    model = restored_runs.load_trained_model(config, trained)
    neck = extract.extract(model, "test", descriptor="embedding")
    assert list(neck.ids) == list(test.ids)
    kernel = checkpointing.load_stage(trained)["params"]["head"]["kernel"].astype(np.float64)
    head_cos = neck.embeddings @ (kernel / np.linalg.norm(kernel, axis=0))
    head_cos = head_cos[:, : label_map.num_classes]
    order = np.argsort(-head_cos, axis=1, kind="stable")[:, :5]
    top_landmarks = label_map.landmark_ids[order]
    top_scores = np.take_along_axis(head_cos, order, axis=1)
    distances, neighbors = knn.search(test.embeddings, train.embeddings, 20, backend="exact")
    neighbor_landmarks = label_map.landmark_ids[train.labels][neighbors]
    labels, fused = recognition.fuse_with_classifier(
        neighbor_landmarks,
        1.0 - distances / 2.0,
        top_landmarks,
        top_scores,
        knn_power=9.0,
        classifier_power=10.0,
    )
    assert {i: written[i][0] for i in written} == dict(zip(test.ids, labels.tolist(), strict=True))
    # The penalty by its definition: all 12 references are within k = 20.
    reference_cos = test.embeddings.astype(np.float64) @ references.embeddings.T
    penalty = 0.7 * (np.maximum(reference_cos, 0.0) ** 9).sum(axis=1)
    np.testing.assert_allclose(
        [written[i][1] for i in test.ids], fused - penalty, rtol=1e-4, atol=1e-6
    )
    rec_solution = solutions.read_recognition_solution(f"{demo['raw']}/recognition_solution.csv")
    truth = {**rec_solution[solutions.PUBLIC], **rec_solution[solutions.PRIVATE]}
    unpenalized = {i: (int(a), float(b)) for i, a, b in zip(test.ids, labels, fused, strict=True)}
    assert result["gap_without_non_landmark_penalty"] == pytest.approx(
        metrics.global_average_precision(unpenalized, truth), abs=1e-6
    )
    # Top-1 of each labeller on the images with ground truth, counted here.
    knn_labels, _ = recognition.knn_vote(neighbor_landmarks, 1.0 - distances / 2.0)
    has_truth = [n for n, i in enumerate(test.ids) if truth.get(i)]
    assert result["recognition_queries"] == len(has_truth) > 0
    labellers = {"knn": knn_labels, "classifier": top_landmarks[:, 0], "fused": labels}
    for name, chosen in labellers.items():
        correct = sum(chosen[n] in truth[test.ids[n]] for n in has_truth)
        assert result["recognition_top1"][name] == pytest.approx(correct / len(has_truth)), name


def test_scann_backend_matches_exact_search(demo, trained):
    result = evaluation.evaluate(eval_config(demo, knn_backend="scann"), trained)
    out = os.path.join(trained, "eval")
    retrieval = solutions.read_retrieval_predictions(os.path.join(out, "retrieval_submission.csv"))
    assert sorted(retrieval) == sorted(csv_ids(f"{demo['raw']}/test.csv"))
    assert 0.0 <= result["map@100"] <= 1.0
    # A tiny index is searched by brute force inside ScaNN: recall is 1.
    assert result[f"scann_recall@{len(csv_ids(demo['raw'] + '/index.csv'))}"] == 1.0
    # On the same embeddings both backends return the same distances, best
    # first (ids of near-equal distances may swap places).
    index = extract.Embeddings.load(os.path.join(out, "embeddings-index-0.npz"))
    test = extract.Embeddings.load(os.path.join(out, "embeddings-test-0.npz"))
    k = len(index.ids)
    d_scann, _ = knn.search(test.embeddings, index.embeddings, k, backend="scann")
    d_exact, _ = knn.search(test.embeddings, index.embeddings, k, backend="exact")
    np.testing.assert_allclose(d_scann, d_exact, atol=1e-5)


def test_a_workdir_without_a_checkpoint_says_so_and_gets_nothing(demo, trained, tmp_path):
    workdir = tmp_path / "run"
    workdir.mkdir()
    shutil.copy(os.path.join(trained, "config.json"), workdir)  # a run that never saved
    with pytest.raises(FileNotFoundError, match="nothing to evaluate: no checkpoint in"):
        evaluation.evaluate(eval_config(demo), str(workdir))
    assert os.listdir(workdir) == ["config.json"]


def test_a_rebuilt_split_is_embedded_again(demo, trained, tmp_path, caplog):
    """The embedding cache is keyed on the data (the build's id and shard
    lengths), not on the folder's path: a data set rebuilt in place is not
    served stale."""
    data = str(tmp_path / "data")
    shutil.copytree(demo["full"], data)
    workdir = str(tmp_path / "run")
    shutil.copytree(trained, workdir, ignore=shutil.ignore_patterns("eval"))
    config = eval_config(demo, train_split="", gallery_queries=0)
    config.data_dir = data
    evaluation.evaluate(config, workdir)
    cache = os.path.join(workdir, "eval", "embeddings-test-0.npz")
    before = extract.Embeddings.load(cache)
    assert sorted(before.ids) == sorted(csv_ids(f"{demo['raw']}/test.csv"))

    # The data set rebuilt in the same folder with half of the test images,
    # one retrieval query among those left out.
    solution = solutions.read_retrieval_solution(f"{demo['raw']}/retrieval_solution.csv")
    scored = solutions.merged_usages(solution)
    a_query = sorted(scored)[0]
    ids = [i for i in csv_ids(f"{demo['raw']}/test.csv")[::2] if i != a_query]
    raw = tmp_path / "raw_half"
    raw.mkdir()
    for name in os.listdir(demo["raw"]):
        if name != "test.csv":
            os.symlink(os.path.join(demo["raw"], name), raw / name)
    (raw / "test.csv").write_text("id\n" + "\n".join(ids) + "\n")
    rebuilt = build_tfds(str(raw), str(tmp_path / "tfds"))
    shutil.rmtree(data)
    shutil.copytree(rebuilt, data)
    with caplog.at_level(logging.WARNING):
        result = evaluation.evaluate(config, workdir)
    after = extract.Embeddings.load(cache)
    # The solution still lists the removed queries: reported, not silent.
    missing = sorted(set(scored) - set(ids))
    assert result["retrieval_queries_missing"] == len(missing) > 0
    assert f"{len(missing)} of its {len(scored)} scored test ids are not in the test split" in (
        caplog.text
    )
    assert sorted(after.ids) == sorted(ids)
    assert after.settings["data"] != before.settings["data"]
    submitted = solutions.read_retrieval_predictions(
        os.path.join(workdir, "eval", "retrieval_submission.csv")
    )
    assert sorted(submitted) == sorted(ids)


def test_rerank_steps_are_scored_beside_the_first_search(demo, trained, tmp_path):
    """eval.rerank: mAP@100 and, with eval.rerank_recognition, GAP of the
    first search and after each step, the last submitted; the rankings
    those of the steps applied to the cached embeddings (the steps are
    checked against their equations in test_rerank.py)."""
    steps = ("dba(n=1, alpha=3)", "alpha_qe(n=2, alpha=3)")
    labels = ["first stage", steps[0], f"{steps[0]} + {steps[1]}"]
    config = eval_config(demo, rerank=steps, rerank_recognition=True)
    scored = evaluation.evaluate(config, trained)
    tables = scored["rerank"]
    assert list(tables) == ["retrieval", "recognition"]
    for table in tables.values():
        assert list(table) == labels and all(row["seconds"] >= 0 for row in table.values())
    assert scored["map@100"] == tables["retrieval"][labels[-1]]["map@100"]
    assert scored["gap"] == tables["recognition"][labels[-1]]["gap"]

    out = os.path.join(trained, "eval")
    index, test, train = (
        extract.Embeddings.load(os.path.join(out, f"embeddings-{split}-0.npz"))
        for split in ("index", "test", "train")
    )
    final = rerank.rerank_searches(
        test.embeddings, index.embeddings, rerank.parse_steps(steps), len(index.ids), "exact"
    )[-1].neighbors
    with open(os.path.join(out, "retrieval_submission.csv")) as f:
        submitted = {row["id"]: row["images"].split() for row in csv.DictReader(f)}
    for q, row in zip(test.ids, final, strict=True):
        assert submitted[q] == [str(index.ids[j]) for j in row]
    solution = solutions.merged_usages(
        solutions.read_retrieval_solution(config.eval.retrieval_solution)
    )
    predictions = {q: submitted[q] for q in solution if q in submitted}
    assert scored["map@100"] == pytest.approx(
        metrics.mean_average_precision(predictions, solution), abs=1e-9
    )
    # The first stage is the plain search of the same embeddings.
    _, first = exact_search.exact_search(test.embeddings, index.embeddings, k=len(index.ids))
    plain = {q: [str(index.ids[j]) for j in row] for q, row in zip(test.ids, first, strict=True)}
    assert tables["retrieval"]["first stage"]["map@100"] == pytest.approx(
        metrics.mean_average_precision({q: plain[q] for q in solution if q in plain}, solution),
        abs=1e-9,
    )
    # Recognition's GAP is the submission's, scored by the published definition.
    with open(os.path.join(out, "recognition_submission.csv")) as f:
        rows = {row["id"]: row["landmarks"].split() for row in csv.DictReader(f)}
    truth = solutions.merged_usages(
        solutions.read_recognition_solution(config.eval.recognition_solution)
    )
    guesses = {q: (int(rows[q][0]), float(rows[q][1])) for q in truth if rows.get(q)}
    assert scored["gap"] == pytest.approx(
        metrics.global_average_precision(guesses, truth), abs=1e-6
    )
    # The index and train self-searches (dba's) are kept: exact search of the rows.
    for split, emb in (("index", index), ("train", train)):
        kept = np.load(os.path.join(out, f"neighbours-{split}.npz"))
        _, want = exact_search.exact_search(emb.embeddings, emb.embeddings, k=2)
        np.testing.assert_array_equal(kept["neighbors"], want)
    printed = evaluation.format_metrics(scored)
    assert printed.splitlines()[-4].split()[:4] == ["re-ranking", "mAP@100", "GAP", "seconds"]
    assert printed.splitlines()[-1].startswith(labels[-1])


def test_ensemble_of_one_model_twice_ranks_like_the_model(demo, trained, tmp_path):
    single = evaluation.evaluate(eval_config(demo, train_split=""), trained)
    ensemble_dir = str(tmp_path / "ensemble")
    config = eval_config(demo, train_split="")
    copy = str(tmp_path / "copy")  # the same weights as a second member
    shutil.copytree(trained, copy, ignore=shutil.ignore_patterns("eval"))
    config.eval.ensemble = (
        {"workdir": trained, "weight": 1.0},
        {"workdir": copy, "weight": 0.5},
    )
    combined = evaluation.evaluate(config, ensemble_dir)
    assert combined["members"] == [trained, copy]
    out = os.path.join(ensemble_dir, "eval")
    parts = {
        (split, i): extract.Embeddings.load(os.path.join(out, f"embeddings-{split}-{i}.npz"))
        for split in ("index", "test")
        for i in (0, 1)
    }
    for split in ("index", "test"):
        np.testing.assert_array_equal(parts[split, 0].embeddings, parts[split, 1].embeddings)
    # Weighted concatenation: every squared distance is (1 + 0.5^2) times the
    # single model's, so the ranking is the model's.
    combined_index = ensemble.combine_embeddings(
        [parts["index", 0].embeddings, parts["index", 1].embeddings], [1.0, 0.5]
    )
    combined_test = ensemble.combine_embeddings(
        [parts["test", 0].embeddings, parts["test", 1].embeddings], [1.0, 0.5]
    )
    k = len(parts["index", 0].ids)
    d_single, _ = knn.search(
        parts["test", 0].embeddings, parts["index", 0].embeddings, k, backend="exact"
    )
    d_combined, _ = knn.search(combined_test, combined_index, k, backend="exact")
    np.testing.assert_allclose(d_combined, 1.25 * d_single, atol=1e-5)
    assert 0.0 <= combined["map@100"] <= 1.0 and 0.0 <= single["map@100"] <= 1.0


def _recognition_rows(path):
    with open(path) as f:
        return {row["id"]: row["landmarks"].split() for row in csv.DictReader(f)}


@pytest.mark.multiprocess
def test_two_processes_train_then_evaluate_as_one(demo, tmp_path):
    """2 processes x 4 CPU devices, started once: they train together (one
    mesh, each process reading its shards), then evaluate the run, every
    process extracting its share and process 0 writing the files, which are
    those of one process on the same 8 devices (so the embeddings are the same
    to the bit and so is every ranking; test_evaluate_on_another_device_count...
    changes the device count)."""
    workdir = str(tmp_path / "run")
    cmd = [
        sys.executable,
        os.path.join(REPO, "tests", "helpers", "train_then_evaluate.py"),
        "--config=configs/demo.py:smoke",
        f"--workdir={workdir}",
        f"--config.data_dir={demo['full']}",
        "--config.total_steps=2",
        "--config.log_every_steps=1",
        "--config.checkpoint_every_steps=1",
        f"--config.eval.retrieval_solution={demo['raw']}/retrieval_solution.csv",
        f"--config.eval.recognition_solution={demo['raw']}/recognition_solution.csv",
        "--config.eval.knn_backend=exact",
        "--config.eval.gallery_queries=3",
        "--config.eval.baselines=()",
    ]
    outputs = run_processes(cmd, num_processes=2, devices_per_process=4)
    assert "JAX process 0/2, 8 devices" in outputs[0]
    assert "JAX process 1/2, 8 devices" in outputs[1]
    losses = losses_of(workdir)
    assert sorted(losses) == [1, 2] and all(np.isfinite(list(losses.values())))
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["1", "2"]
    assert "map@100: " in outputs[0] and "map@100: " not in outputs[1]  # process 0 prints

    one_process = str(tmp_path / "one")
    shutil.copytree(workdir, one_process, ignore=shutil.ignore_patterns("eval"))
    reference = evaluation.evaluate(eval_config(demo, gallery_queries=3), one_process)
    one, two = os.path.join(one_process, "eval"), os.path.join(workdir, "eval")
    written = json.load(open(os.path.join(two, "metrics.json")))
    assert written["map@100"] == pytest.approx(reference["map@100"], abs=1e-6)
    assert written["gap"] == pytest.approx(reference["gap"], abs=1e-6)
    for usage, scores in reference["retrieval"].items():
        assert written["retrieval"][usage] == pytest.approx(scores, abs=1e-6), usage
    assert (
        open(os.path.join(two, "retrieval_submission.csv")).read()
        == open(os.path.join(one, "retrieval_submission.csv")).read()
    )
    got = _recognition_rows(os.path.join(two, "recognition_submission.csv"))
    want = _recognition_rows(os.path.join(one, "recognition_submission.csv"))
    assert sorted(got) == sorted(want)
    for image_id, row in want.items():
        assert got[image_id][::2] == row[::2], image_id  # the landmark
        np.testing.assert_allclose(
            [float(x) for x in got[image_id][1::2]], [float(x) for x in row[1::2]], atol=1e-5
        )
    assert os.path.isfile(os.path.join(two, "gallery.png"))


def test_evaluate_on_another_device_count_and_refuses_a_contradicting_model_flag(demo, trained):
    # Trained on 8 devices, evaluated on 2: a checkpoint loads on any topology.
    env = subprocess_env(2)
    cmd = [
        sys.executable,
        "-m",
        "landmark_jax.evaluate",
        "--config=configs/demo.py:smoke",
        f"--workdir={trained}",
        f"--config.data_dir={demo['full']}",
        f"--config.eval.retrieval_solution={demo['raw']}/retrieval_solution.csv",
        "--config.eval.train_split=",
        "--config.eval.knn_backend=exact",
    ]
    result = subprocess.run(
        [*cmd, "--config.eval.baselines=('raw_pixels', 'chance')"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "map@100: " in result.stdout and "gap" not in result.stdout
    assert "queries: learned 0." in result.stdout and "| raw pixels 0." in result.stdout
    # The model comes from the workdir's config.json: a model flag that
    # contradicts it is refused before anything is extracted (the program
    # passes its --config.model.* flags as evaluate's model_overrides).
    config = eval_config(demo)
    with pytest.raises(ValueError, match=r"--config.model.input_normalization='caffe' but .*drop"):
        evaluation.evaluate(config, trained, {"model.input_normalization": "caffe"})


def test_an_unreadable_embedding_cache_is_named_and_extracted_again(
    demo, trained, tmp_path, caplog
):
    """A cache cut short (a killed write) or holding pickled objects (planted)
    is logged with its path and the problem, never unpickled, and the split
    is embedded again into the same file."""
    config = eval_config(demo)
    members = [ensemble.EnsembleMember(str(tmp_path), 1.0, None)]
    models = [restored_runs.load_trained_model(config, trained)]
    mesh = sharding.create_mesh()
    first = evaluation.embed_split(config, str(tmp_path), "test", members, models, mesh)
    cache = tmp_path / "eval" / "embeddings-test-0.npz"
    good = cache.read_bytes()
    planted = tmp_path / "planted.npz"
    np.savez(planted, ids=np.array([os.system], dtype=object), embeddings=np.zeros((1, 2)))
    for bad, problem in [
        (good[: len(good) // 2], "BadZipFile"),
        (planted.read_bytes(), "Object arrays cannot be loaded"),
    ]:
        cache.write_bytes(bad)
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            again = evaluation.embed_split(config, str(tmp_path), "test", members, models, mesh)
        assert f"unreadable embedding cache {cache}: " in caplog.text and problem in caplog.text
        assert list(again.ids) == list(first.ids)
        np.testing.assert_allclose(again.embeddings, first.embeddings, atol=1e-6)
        reread = extract.Embeddings.load(str(cache))  # overwritten with a good cache
        assert list(reread.ids) == list(first.ids)


def test_the_train_split_is_embedded_only_for_recognition_that_is_scored_or_written(
    demo, trained, tmp_path, monkeypatch, caplog
):
    """GLR2020-style (a retrieval solution, no recognition solution): only the
    index and test splits are extracted and no recognition file is written
    (before, the train split was embedded for nothing: GLDv2's 4.1M images).
    eval.recognition_submission=True: the train split (and the non-landmark
    one) too, and the submission labels each test image with its kNN vote."""
    workdir = str(tmp_path / "run")
    shutil.copytree(trained, workdir, ignore=shutil.ignore_patterns("eval"))
    out = os.path.join(workdir, "eval")
    requested = []
    real_extract = extract.extract

    def recording_extract(model, split, **kwargs):
        requested.append(split)
        return real_extract(model, split, **kwargs)

    monkeypatch.setattr(extract, "extract", recording_extract)
    config = eval_config(demo, recognition_solution="", baselines=(), gallery_queries=0)
    assert config.eval.train_split == "train" and config.eval.recognition_submission is False
    with caplog.at_level(logging.INFO):
        metrics = evaluation.evaluate(config, workdir)
    assert requested == ["index", "test"]
    assert "map@100" in metrics and "gap" not in metrics
    assert sorted(os.listdir(out)) == [
        "embeddings-index-0.npz",
        "embeddings-test-0.npz",
        "metrics.json",
        "retrieval_submission.csv",
    ]
    assert "Recognition skipped: no config.eval.recognition_solution" in caplog.text

    requested.clear()
    config.eval.recognition_submission = True
    metrics = evaluation.evaluate(config, workdir)
    assert requested == ["train", "nonlandmark"]  # index and test: the cache of the first run
    assert "gap" not in metrics  # nothing to score it with
    written = solutions.read_recognition_predictions(
        os.path.join(out, "recognition_submission.csv")
    )
    # By hand: each test image's 5 nearest train images vote max(cos, 0)^9
    # for their landmark (the non-landmark penalty lowers scores, not labels).
    test = extract.Embeddings.load(os.path.join(out, "embeddings-test-0.npz"))
    train = extract.Embeddings.load(os.path.join(out, "embeddings-train-0.npz"))
    landmarks = data_format.read_label_map(demo["full"]).landmark_ids[train.labels]
    cosine = test.embeddings.astype(np.float64) @ train.embeddings.astype(np.float64).T
    assert sorted(written) == sorted(test.ids)
    for row, image_id in enumerate(test.ids):
        votes = {}
        for j in np.argsort(-cosine[row])[: config.eval.recognition_k]:
            votes[landmarks[j]] = votes.get(landmarks[j], 0.0) + max(cosine[row, j], 0.0) ** 9
        best = max(sorted(votes), key=lambda landmark: votes[landmark])
        assert written[image_id][0] == best, image_id
