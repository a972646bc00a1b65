"""`python -m landmark_jax.search`: own photos against an index, as `evaluate` ranks them.

One index of the demo's raw index images (plus a non-image and an
unreadable file) is built once with the session's trained demo run and shared;
references are computed independently: `extract` on the demo's TFDS build
(the same JPEG bytes) and numpy search and voting.
"""

import csv
import dataclasses
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from configs_for_tests import REPO
from PIL import Image

from landmark_jax.data import data_format
from landmark_jax.retrieval import extract, gallery, recognition, rerank
from landmark_jax.serving import photo_files, photo_index, photo_model, photo_search
from landmark_jax.workdir import run_config

from cpu_devices import subprocess_env

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def model(trained_demo):
    return photo_model.from_run(trained_demo)


@pytest.fixture(scope="module")
def photos(demo, tmp_path_factory):
    """The demo's raw index images in a folder of their own, with a text file
    and a dangling link among them; and the raw test images' folder."""
    root = tmp_path_factory.mktemp("photos")
    shutil.copytree(f"{demo['raw']}/index", root / "index")
    (root / "index" / "notes.txt").write_text("not a photo\n")
    os.symlink(root / "gone.jpg", root / "index" / "broken.jpg")
    return {"index": str(root / "index"), "test": f"{demo['raw']}/test"}


@pytest.fixture(scope="module")
def built(model, photos, tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("search") / "index")
    info = photo_index.build_index(directory, model, images=[photos["index"]], part_size=4)
    return directory, info


@pytest.fixture(scope="module")
def reference(model, demo):
    """The evaluation's embeddings of the demo build's index and test splits."""
    trained = model.models[0]
    options = extract.extraction_options(model.config, trained)
    return {
        split: extract.extract(trained, split, data_dir=demo["full"], **options)
        for split in ("index", "test")
    }


@pytest.fixture(scope="module")
def queried(built, model, photos):
    index = photo_index.load_index(built[0])
    return index, photo_search.query_photos(index, model, [photos["test"]], k=5)


def squared_l2_order(queries, index):
    d = ((queries[:, None, :] - index[None, :, :]) ** 2).sum(-1)
    return np.argsort(d, axis=1, kind="stable"), d


def test_raw_images_are_the_builds_bytes(demo):
    info = data_format.read_split_info(demo["full"], "test")
    import tensorflow as tf

    records = tf.data.TFRecordDataset(list(info.files)).take(3)
    for record in records.as_numpy_iterator():
        example = tf.train.Example.FromString(record)
        image_id = example.features.feature["id"].bytes_list.value[0].decode()
        encoded = example.features.feature["image"].bytes_list.value[0]
        path = f"{demo['raw']}/test/{image_id[0]}/{image_id[1]}/{image_id[2]}/{image_id}.jpg"
        assert open(path, "rb").read() == encoded


def test_index_and_query_rank_as_the_evaluation(built, queried, reference):
    directory, info = built
    index, result = queried
    ref_index, ref_test = reference["index"], reference["test"]
    assert info["count"] == len(ref_index.ids) and sorted(index.ids) == sorted(ref_index.ids)
    # The same descriptors as evaluate's, photo by photo.
    row_of = {i: n for n, i in enumerate(ref_index.ids)}
    np.testing.assert_allclose(
        index.embeddings, ref_index.embeddings[[row_of[i] for i in index.ids]], atol=1e-5
    )
    assert sorted(result.ids) == sorted(ref_test.ids)
    order, _ = squared_l2_order(ref_test.embeddings, ref_index.embeddings)
    expected = {
        q: [str(ref_index.ids[j]) for j in row[:5]]
        for q, row in zip(ref_test.ids, order, strict=True)
    }
    got = {
        q: [str(index.ids[j]) for j in row]
        for q, row in zip(result.ids, result.neighbors, strict=True)
    }
    assert got == expected
    cos = 1.0 - result.distances / 2.0
    np.testing.assert_allclose(result.scores, cos, atol=1e-6)


def test_query_re_ranks_as_the_evaluation(built, queried, model, photos):
    """--rerank: the last ranking of the steps applied to the query photos'
    descriptors and the index's, as evaluate ranks them; the index's
    self-search (dba's) kept in the index folder."""
    index = photo_index.load_index(built[0])
    steps = rerank.parse_steps(["dba(n=1, alpha=3)", "alpha_qe(n=2, alpha=3)"])
    subset = [f"{photos['test']}/0/*/*/*.jpg"]  # the photos whose ids start with 0
    result = photo_search.query_photos(index, model, subset, k=5, rerank_steps=steps)
    want = rerank.rerank_searches(result.embeddings, index.embeddings, steps, 5, "exact")[-1]
    np.testing.assert_array_equal(result.neighbors, want.neighbors)
    np.testing.assert_allclose(result.scores, 1.0 - want.distances / 2.0, atol=1e-6)
    _, plain = queried  # every test photo, searched without the steps
    rows = [plain.ids.index(i) for i in result.ids]
    assert not np.array_equal(plain.neighbors[rows], result.neighbors)  # the check can fail
    kept = np.load(f"{built[0]}/neighbours-index.npz")
    assert kept["neighbors"].shape == (len(index.ids), 2)


def test_outputs_and_gallery(built, queried, model, tmp_path):
    index, result = queried
    written = photo_search.write_outputs(str(tmp_path), index, model, result, gallery_queries=3)
    with open(written["neighbours_csv"]) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 5 * len(result.ids)
    first = [r for r in rows if r["query"] == result.ids[0]]
    assert [r["id"] for r in first] == [str(index.ids[j]) for j in result.neighbors[0]]
    assert all(os.path.isfile(r["path"]) for r in first)
    payload = json.load(open(written["neighbours_json"]))
    assert [q["id"] for q in payload["queries"]] == result.ids
    image = Image.open(written["gallery"])
    assert image.format == "PNG"
    assert image.size == gallery.GalleryLayout(96, 5, has_title=True).size(3)  # k=5 columns


def test_bad_files_are_listed_and_counted(built, photos):
    directory, info = built
    skipped = {os.path.basename(s["path"]): s["reason"] for s in info["skipped"]}
    assert set(skipped) == {"notes.txt", "broken.jpg"}
    assert "not an image" in skipped["notes.txt"]
    assert "unreadable" in skipped["broken.jpg"]
    assert json.load(open(f"{directory}/index_info.json"))["skipped"] == info["skipped"]
    assert "2 file(s) skipped" in photo_files.count_skipped(
        photo_files.Skipped(**s) for s in info["skipped"]
    )


def test_a_source_without_files_is_an_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=f"{tmp_path}/empty: lists no files"):
        photo_files.list_photo_files([str(tmp_path / "empty")])
    with pytest.raises(ValueError, match=r"\*\.png: lists no files"):
        photo_files.list_photo_files([f"{tmp_path}/*.png"])
    with pytest.raises(FileNotFoundError, match="missing: no such file"):
        photo_files.list_photo_files([str(tmp_path / "missing")])


def test_an_interrupted_index_is_continued(built, model, photos, tmp_path):
    directory, _ = built
    resumed_dir = tmp_path / "resumed"
    (resumed_dir / "parts").mkdir(parents=True)
    shutil.copy(f"{directory}/parts/part-00000.npz", resumed_dir / "parts")
    shutil.copy(f"{directory}/index_info.json", resumed_dir)
    planted = np.load(resumed_dir / "parts" / "part-00000.npz")
    done = len(planted["paths"]) + len(json.loads(str(planted["skipped"])))
    embedded = []

    def counting(images):
        embedded.append(len(images))
        return model.embed_photos(images)

    counted = dataclasses.replace(model, embed_photos=counting)
    info = photo_index.build_index(str(resumed_dir), counted, images=[photos["index"]], part_size=4)
    listed = len(photo_files.list_photo_files([photos["index"]]))
    assert info["resumed"] == done and 0 < done < listed  # parts of 4: the first of 3
    assert sum(embedded) > 0
    assert sum(embedded) == listed - done - (2 - len(json.loads(str(planted["skipped"]))))
    again, first = photo_index.load_index(str(resumed_dir)), photo_index.load_index(directory)
    assert list(again.ids) == list(first.ids)
    np.testing.assert_array_equal(again.embeddings, first.embeddings)
    assert sorted(s["path"] for s in info["skipped"]) == sorted(
        s["path"] for s in first.info["skipped"]
    )


def test_another_model_or_source_is_refused(built, model, trained_demo, demo, photos, queried):
    directory, _ = built
    config = run_config.read_run_config(trained_demo)
    config.eval.flip = True
    flipped = photo_model.from_run(trained_demo, config)
    with pytest.raises(ValueError, match="built with run .*uses run .*flip: False != True"):
        photo_index.build_index(directory, flipped, images=[photos["index"]])
    with pytest.raises(ValueError, match="cannot take .*'split': 'test'"):
        photo_index.build_index(directory, model, data_dir=demo["full"], split="test")
    index, _ = queried
    with pytest.raises(ValueError, match="their descriptors differ"):
        photo_search.query_photos(index, flipped, [photos["test"]], k=5)


def test_recognize_votes_as_recognition(model, demo, photos, tmp_path):
    directory = str(tmp_path / "train_index")
    info = photo_index.build_index(directory, model, data_dir=demo["full"], split="train")
    assert info["labelled"] and info["non_landmark_split"] == "nonlandmark"
    index = photo_index.load_index(directory)
    label_map = data_format.read_label_map(demo["full"])
    train = extract.extract(
        model.models[0], "train", data_dir=demo["full"],
        **extract.extraction_options(model.config, model.models[0]),
    )  # fmt: skip
    np.testing.assert_array_equal(index.labels, label_map.landmark_ids[train.labels])
    result = photo_search.query_photos(index, model, [photos["test"]], k=3, recognize=True)

    settings = index.info["search"]
    k, power = settings["recognition_k"], settings["recognition_power"]
    order, d = squared_l2_order(result.embeddings, index.embeddings)
    rows = order[:, :k]
    cos = 1.0 - np.take_along_axis(d, rows, axis=1) / 2.0
    labels, scores = recognition.knn_vote(index.labels[rows], cos, power=power)
    nl_order, nl_d = squared_l2_order(result.embeddings, index.non_landmarks)
    nl_k = settings["non_landmark_k"] or k
    nl_cos = 1.0 - np.take_along_axis(nl_d, nl_order[:, :nl_k], axis=1) / 2.0
    scores = scores - settings["non_landmark_weight"] * (np.maximum(nl_cos, 0) ** power).sum(1)
    np.testing.assert_array_equal(result.landmarks, labels)
    # float32 distances (the search's |q|^2 + |x|^2 - 2 q.x, numpy's direct
    # differences here) raised to the 9th power: a few 1e-6 apart.
    np.testing.assert_allclose(result.confidences, scores, rtol=1e-5, atol=2e-5)

    unlabelled = photo_index.load_index(str(tmp_path / "train_index"))
    unlabelled.info["labelled"] = False
    with pytest.raises(ValueError, match="--split=train"):
        photo_search.query_photos(unlabelled, model, [photos["test"]], k=3, recognize=True)


def test_search_program(built, photos, tmp_path):
    directory, _ = built
    out = tmp_path / "out"
    bad = tmp_path / "queries"
    bad.mkdir()
    (bad / "readme.md").write_text("# not a photo\n")
    cmd = [
        sys.executable, "-m", "landmark_jax.search", "query", f"--index_dir={directory}",
        f"--images={photos['test']},{bad}", f"--output={out}", "--k=3", "--gallery_queries=2",
        "--rerank=alpha_qe(n=2, alpha=3)",
    ]  # fmt: skip
    result = subprocess.run(
        cmd, cwd=REPO, env=subprocess_env(1), capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "1 file(s) skipped" in result.stdout and "readme.md" in result.stdout
    assert ", re-ranked by alpha_qe(n=2, alpha=3); wrote:" in result.stdout
    assert {p.name for p in out.iterdir()} == {"neighbours.csv", "neighbours.json", "gallery.png"}


def test_saved_model_gives_the_runs_descriptors(built, model, trained_demo, photos, tmp_path):
    from landmark_jax.serving import saved_model

    export = str(tmp_path / "export")
    with pytest.MonkeyPatch.context() as patch:  # the CPU's lowering: one, not three
        patch.setattr(saved_model, "PLATFORMS", ("cpu",))
        saved_model.export(run_config.read_run_config(trained_demo), trained_demo, export)
    exported = photo_model.from_saved_model(export)
    paths = photo_files.list_photo_files([photos["test"]])[:3]
    images = [p.image for p in photo_files.read_photos(paths)]
    np.testing.assert_allclose(exported.embed_photos(images), model.embed_photos(images), atol=1e-5)
    # The export's identity is its run's: the run's index takes its queries.
    index = photo_index.load_index(built[0])
    result = photo_search.query_photos(index, exported, paths, k=2)
    assert result.neighbors.shape == (3, 2)
