"""Revisited Oxford/Paris: the TFDS builder and the evaluation, on a tiny synthetic set.

The builds are checked against references of their own: the image files,
PIL's crops of them, the gnd pickle, and the shard files parsed with protobuf
(and TFDS's own reader for the decoded images).
"""

import functools
import io
import json
import os
import pickle
import shutil
import uuid

import jax
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from configs_for_tests import load_config
from PIL import Image
from tfds_builds import tfds_order
from tiny_revisited import BOXES, EXPECTED_BOXES, NUM_DB, make_tiny_set

from data_pipelines import build_dataset, describe_dataset, image_encoding, revisited_builder
from landmark_jax.data import data_format, revisited_gnd, sized_eval_input
from landmark_jax.retrieval import (
    ensemble,
    evaluation,
    extract,
    metrics,
    rerank,
    restored_runs,
    revisited,
    shape_buckets,
)
from landmark_jax.runtime import entry_point_errors, file_io, sharding

from backbone_variables import random_variables

DATASET = "revisited_oxford_paris"


@pytest.fixture()
def tiny_set(tmp_path):
    return make_tiny_set(tmp_path / "raw")


@pytest.fixture(scope="module")
def trained(demo, trained_demo):
    """(config, workdir) of the session's demo smoke run (conftest.py)."""
    config = load_config("demo", "smoke")
    config.data_dir = demo["full"]
    return config, trained_demo


def build(dataset: str, data_dir: str, manual_dir: str, **kwargs) -> str:
    """Builds through the command line's function; returns the build folder."""
    kwargs = {"num_workers": 1, "num_shards": 2, **kwargs}
    builder, _ = build_dataset.build(dataset, data_dir, manual_dir=manual_dir, **kwargs)
    return os.fspath(builder.data_dir)


def read_split(out_dir: str, split: str) -> list[tuple[str, bytes]]:
    """(id, JPEG bytes) of a split in file order, parsed with protobuf, checked
    against data_format.read_split_info."""
    info = data_format.read_split_info(out_dir, split)
    rows = []
    for path, count in zip(info.files, info.file_examples, strict=True):
        records = list(tf.data.TFRecordDataset(path).as_numpy_iterator())
        assert len(records) == count, path
        for raw in records:
            feats = tf.train.Example.FromString(raw).features.feature
            assert set(feats) == {data_format.ID, data_format.IMAGE}
            rows.append(
                (
                    feats[data_format.ID].bytes_list.value[0].decode(),
                    feats[data_format.IMAGE].bytes_list.value[0],
                )
            )
    return rows


def metadata(build_dir: str) -> dict:
    return json.load(open(os.path.join(build_dir, "metadata.json")))


def shard_bytes(build_dir: str) -> dict[str, bytes]:
    return {
        name: file_io.read_bytes(file_io.join(build_dir, name))
        for name in sorted(file_io.listdir(build_dir))
        if ".tfrecord-" in name
    }


def decode(jpeg: bytes) -> np.ndarray:
    image = Image.open(io.BytesIO(jpeg))
    assert image.format == "JPEG" and image.mode == "RGB"
    return np.asarray(image, np.float32)


def original(tiny: dict, name: str) -> Image.Image:
    return Image.open(os.path.join(tiny["images"], f"{name}.jpg"))


# ---------------------------------------------------------------- the build


def test_build_holds_the_database_and_cropped_queries_in_gnd_order(revisited_data):
    tiny, build_dir = revisited_data
    gnd = tiny["data"]
    db, queries = read_split(build_dir, "revisited_db"), read_split(build_dir, "revisited_query")
    # Unshuffled: file order is gnd order, so the easy/hard/junk indices are row numbers.
    assert [i for i, _ in db] == gnd["imlist"]
    assert [i for i, _ in queries] == gnd["qimlist"]
    assert tfds_order(build_dir, "revisited_db") == gnd["imlist"]
    for split in ("revisited_db", "revisited_query"):
        assert len(data_format.read_split_info(build_dir, split).files) == 2
    # No side files: the ground truth is in metadata.json.
    assert not [n for n in os.listdir(build_dir) if n.endswith(".pkl")]

    # Database images (RGB JPEGs) are stored byte for byte.
    for name, jpeg in db:
        assert jpeg == open(os.path.join(tiny["images"], f"{name}.jpg"), "rb").read()
    # Each query is its bbx rounded as PIL's crop rounds it, clamped to the
    # image, encoded once as a 4:4:4 JPEG.
    assert metadata(build_dir)["query_boxes"] == [list(b) for b in EXPECTED_BOXES]
    for (name, jpeg), bbx, box in zip(queries, BOXES, EXPECTED_BOXES, strict=True):
        image = original(tiny, name)
        crop = image.crop(box)
        if bbx[1] >= 0 and bbx[2] <= image.width:  # inside: PIL's own float crop is the same
            np.testing.assert_array_equal(np.asarray(image.crop(bbx)), np.asarray(crop))
        out = io.BytesIO()
        crop.save(out, format="JPEG", quality=95, subsampling=0)
        assert jpeg == out.getvalue(), name
        got, expected = decode(jpeg), np.asarray(crop, np.float32)
        assert got.shape == expected.shape, name
        assert np.abs(got - expected).mean() < 2.0 and np.abs(got - expected).max() < 24, name
    # TFDS's own reader decodes the crops at their sizes.
    ds = tfds.builder_from_directory(build_dir).as_dataset(
        split="revisited_query", shuffle_files=False
    )
    shapes = [tuple(ex["image"].shape) for ex in ds.as_numpy_iterator()]
    assert shapes == [(23, 36, 3), (33, 44, 3), (48, 64, 3)]


def test_ground_truth_travels_in_the_metadata(revisited_data, tmp_path):
    tiny, build_dir = revisited_data
    expected = revisited_gnd.read_revisited_gnd(tiny["gnd"])
    assert revisited.read_gnd(build_dir) == expected
    # The TFDS data dir above the one build names it too.
    data_dir = os.path.dirname(os.path.dirname(os.path.dirname(build_dir)))
    assert revisited.read_gnd(data_dir) == expected
    meta = metadata(build_dir)
    assert meta[data_format.REVISITED_GND] == expected
    assert meta["source"] == {
        "manual_dir": os.path.abspath(tiny["manual_dir"]),
        "gnd_file": "gnd_roxford5k.pkl",
        "crop_queries": True,
        "jpeg_quality": 95,
    }
    assert len(meta[data_format.BUILD_ID]) == 32

    # A copy whose metadata lacks the ground truth, or holds a broken one.
    copy = str(tmp_path / "copy")
    shutil.copytree(build_dir, copy)
    where = os.path.join(copy, "metadata.json")
    broken = json.loads(json.dumps(meta))
    broken[data_format.REVISITED_GND]["gnd"][0]["easy"] = [0, 99]
    json.dump(broken, open(where, "w"))
    with pytest.raises(
        data_format.DataFormatError,
        match=r"metadata.json: gnd: gnd\[0\] \(query 'query_a'\): 'easy' holds \[99\]",
    ):
        revisited.read_gnd(copy)
    del broken[data_format.REVISITED_GND]
    json.dump(broken, open(where, "w"))
    with pytest.raises(
        data_format.DataFormatError, match="metadata.json: no 'gnd'.*not a Revisited"
    ):
        revisited.read_gnd(copy)


@pytest.mark.e2e
def test_full_queries_config_keeps_the_query_images(tiny_set, tmp_path):
    path = build(
        f"{DATASET}/roxford5k_full_queries", str(tmp_path / "tfds"), tiny_set["manual_dir"]
    )
    assert path.endswith(os.path.join("roxford5k_full_queries", "1.0.0"))
    queries = read_split(path, "revisited_query")
    assert [i for i, _ in queries] == tiny_set["data"]["qimlist"]
    for name, jpeg in queries:
        assert jpeg == open(os.path.join(tiny_set["images"], f"{name}.jpg"), "rb").read()
    meta = metadata(path)
    assert meta["source"]["crop_queries"] is False and meta["query_boxes"] == []
    assert revisited.read_gnd(path) == revisited_gnd.read_revisited_gnd(tiny_set["gnd"])


@pytest.mark.e2e
def test_rparis6k_reads_its_own_pickle_and_worker_processes_build_the_same(
    revisited_data, tmp_path
):
    tiny, cropped = revisited_data
    paris = make_tiny_set(tmp_path / "rparis6k", gnd_file="gnd_rparis6k.pkl")
    path = build(f"{DATASET}/rparis6k", str(tmp_path / "tfds"), paris["manual_dir"], num_workers=2)
    assert metadata(path)["source"]["gnd_file"] == "gnd_rparis6k.pkl"
    # The same images (make_tiny_set is seeded): the same shards, byte for
    # byte, as the one-process roxford5k build.
    assert shard_bytes(path) == shard_bytes(cropped)
    with pytest.raises(FileNotFoundError, match=r"gnd_roxford5k\.pkl not found.*gnd_rparis6k"):
        build(f"{DATASET}/roxford5k", str(tmp_path / "tfds"), paris["manual_dir"])


@pytest.mark.e2e
def test_into_ram_equals_a_local_build_and_refuses_worker_processes(
    revisited_data, tmp_path, monkeypatch
):
    import tfds_ram

    from data_pipelines import build_swap

    tfds_ram.register()
    # A build's lease on a URL waits 2 s for a second taker; one process here.
    monkeypatch.setattr(build_swap, "LEASE_SETTLE_SECONDS", 0.05)
    tiny, local = revisited_data
    remote = f"ram://{uuid.uuid4().hex}/tfds"
    try:
        with pytest.raises(ValueError, match=f"--data_dir={remote}.*num_workers=1"):
            build(f"{DATASET}/roxford5k", remote, tiny["manual_dir"], num_workers=2)
        # The default for a ram:// data dir is one process.
        path = build(f"{DATASET}/roxford5k", remote, tiny["manual_dir"], num_workers=None)
        assert path.startswith("ram://")
        assert shard_bytes(path) == shard_bytes(local)
        assert revisited.read_gnd(remote) == revisited.read_gnd(local)
    finally:
        file_io.rmtree(remote)


def _pickled(tiny: dict, **changes) -> None:
    data = {**tiny["data"], **changes}
    with open(tiny["gnd"], "wb") as f:
        pickle.dump(data, f)


@pytest.mark.e2e
def test_builder_errors_name_the_file(tiny_set, tmp_path):
    images, gnd_path, data = tiny_set["images"], tiny_set["gnd"], tiny_set["data"]
    data_dir = tmp_path / "tfds"

    def fails(error, match, **kwargs):
        with pytest.raises(error, match=match) as raised:
            build(f"{DATASET}/roxford5k", str(data_dir), tiny_set["manual_dir"], **kwargs)
        # Nothing half-built is left where the build would go.
        assert os.listdir(data_dir / DATASET / "roxford5k") == []
        return raised.value

    missing = os.path.join(images, "db_05.jpg")
    os.rename(missing, missing + ".bak")
    fails(FileNotFoundError, r"1 image\(s\) of imlist in .*gnd_roxford5k.pkl .*db_05\.jpg")
    os.rename(missing + ".bak", missing)

    fails(ValueError, r"num_shards=4: .*'revisited_query' has 3", num_shards=4)

    good = open(gnd_path, "rb").read()
    _pickled(tiny_set, imlist=[*data["imlist"][:-1], "db_00"])
    fails(ValueError, r"gnd_roxford5k\.pkl: imlist lists 'db_00' twice")
    _pickled(tiny_set, gnd=[{**data["gnd"][0], "easy": [0, 99]}, *data["gnd"][1:]])
    fails(
        data_format.DataFormatError,
        r"gnd_roxford5k\.pkl: gnd\[0\] \(query 'query_a'\): 'easy' holds \[99\]",
    )
    open(gnd_path, "wb").write(b"not a pickle")
    fails(data_format.DataFormatError, r"gnd_roxford5k\.pkl: not a readable gnd pickle")
    for bbx in ([70, 10, 90, 20], [10, 10, 10.2, 30], [30, 10, 20, 30]):
        _pickled(tiny_set, gnd=[{**data["gnd"][0], "bbx": bbx}, *data["gnd"][1:]])
        fails(ValueError, r"query 0 \('query_a', .*query_a\.jpg\): bbx .* is empty inside")
    open(gnd_path, "wb").write(good)

    corrupt_query = os.path.join(images, "query_b.jpg")
    shutil.copy(corrupt_query, corrupt_query + ".bak")
    open(corrupt_query, "wb").write(b"not an image")
    fails(image_encoding.BadImageError, r"query_b\.jpg: cannot decode image")
    shutil.move(corrupt_query + ".bak", corrupt_query)

    with open(os.path.join(images, "db_03.jpg"), "r+b") as f:
        f.truncate(100)
    for num_workers in (1, 2):
        error = fails(image_encoding.BadImageError, r"db_03\.jpg", num_workers=num_workers)
        # Raised from the builder, also when a worker process found it: the
        # command line prints it as a message, not as a bug's traceback.
        assert entry_point_errors.is_user_error(error)

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="--manual_dir"):
        build(f"{DATASET}/roxford5k", str(data_dir), str(empty))


@pytest.mark.e2e
def test_the_registry_and_the_build_command(tiny_set, tmp_path):
    names = build_dataset.dataset_names()
    assert {f"{DATASET}/{c}" for c in ("roxford5k", "rparis6k")} <= set(names)
    assert {f"{DATASET}/{c}_full_queries" for c in ("roxford5k", "rparis6k")} <= set(names)
    # What `tfds build --imports=data_pipelines.revisited_builder` resolves.
    builder = tfds.builder(f"{DATASET}/rparis6k", data_dir=str(tmp_path))
    assert isinstance(builder, revisited_builder.RevisitedOxfordParis)
    assert builder.builder_config.gnd_file == "gnd_rparis6k.pkl"

    # What the command runs (its process is tested once, on GLDv2, in
    # test_gldv2_builder.py): the build, then the summary it prints.
    out = str(tmp_path / "tfds")
    built, reused = build_dataset.build(
        f"{DATASET}/roxford5k",
        out,
        manual_dir=tiny_set["manual_dir"],
        num_shards=1,
        num_workers=1,
    )
    assert not reused
    assert "ground truth: 3 queries over 12 database images" in describe_dataset.summarize(
        str(built.data_dir)
    )
    path = os.path.join(out, DATASET, "roxford5k", "1.0.0")
    assert str(built.data_dir) == path
    assert [i for i, _ in read_split(path, "revisited_query")] == tiny_set["data"]["qimlist"]


# ----------------------------------------------------------- the evaluation


def test_in_gnd_order_reorders_and_rejects_mismatches():
    ids = np.array(["b", "c", "a"])
    emb = extract.Embeddings(ids, np.eye(3, dtype=np.float32), np.full(3, -1))
    ordered = revisited.in_gnd_order(emb, ["a", "b", "c"], "revisited_db", "DIR")
    assert list(ordered.ids) == ["a", "b", "c"]
    np.testing.assert_array_equal(ordered.embeddings, np.eye(3)[[2, 0, 1]])
    with pytest.raises(ValueError, match=r"1 gnd image\(s\) missing.*'d'.*1 not in the gnd"):
        revisited.in_gnd_order(emb, ["a", "b", "d"], "revisited_db", "DIR")
    twice = extract.Embeddings(np.array(["a", "a", "b"]), emb.embeddings, emb.labels)
    with pytest.raises(ValueError, match="'a' twice"):
        revisited.in_gnd_order(twice, ["a", "b"], "revisited_db", "DIR")


def test_rank_database_matches_numpy_and_feeds_revisited_map(tiny_set):
    rng = np.random.default_rng(1)
    database = rng.standard_normal((NUM_DB, 16)).astype(np.float32)
    database /= np.linalg.norm(database, axis=1, keepdims=True)
    queries = database[[0, 4, 7]] + 0.5 * rng.standard_normal((3, 16)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    scores = queries.astype(np.float64) @ database.T.astype(np.float64)
    # Well-separated scores: the ranking is unambiguous.
    assert np.diff(np.sort(scores, axis=1), axis=1).min() > 1e-4
    ranks = revisited.rank_database(queries, database)
    expected_ranks = np.argsort(-scores, axis=1)
    np.testing.assert_array_equal(ranks, expected_ranks)
    gnd = tiny_set["data"]["gnd"]
    got, expected = metrics.revisited_map(ranks, gnd), metrics.revisited_map(expected_ranks, gnd)
    for protocol in ("easy", "medium", "hard"):
        assert got[protocol]["map"] == expected[protocol]["map"]


@pytest.mark.e2e
def test_evaluate_revisited_matches_numpy_ranking(demo, revisited_data, trained):
    tiny_set, data_dir = revisited_data
    trained_config, workdir = trained
    config = trained_config.copy_and_resolve_references()

    # Sides rounded to 8 px: fewer shapes to compile (exact sizes are tested below).
    results = revisited.evaluate_revisited(
        restored_runs.load_trained_model(config, workdir), data_dir, flip=True, size_multiple=8
    )
    assert config.data_dir == demo["full"]  # the caller's config is untouched

    gnd = tiny_set["data"]
    db = extract.Embeddings.load(revisited.embeddings_path(workdir, "revisited_db"))
    queries = extract.Embeddings.load(revisited.embeddings_path(workdir, "revisited_query"))
    assert list(db.ids) == gnd["imlist"] and list(queries.ids) == gnd["qimlist"]
    assert db.settings["flip"] is True
    assert db.settings["resize"] == "native" and db.settings["image_size"] is None
    assert db.settings["size_multiple"] == 8
    np.testing.assert_allclose(np.linalg.norm(db.embeddings, axis=1), 1.0, rtol=1e-5)

    # A model trained for 4 steps embeds every image in nearly the same
    # direction (cosines differ in the 6th decimal), so float32 rounding may
    # order near-ties differently in exact search and in numpy. The saved
    # ranking is checked to be a correct descending sort of the numpy scores,
    # and the metrics to be revisited_map of it; rank_database against numpy
    # argsort on well-separated vectors is tested above.
    scores = queries.embeddings.astype(np.float64) @ db.embeddings.T.astype(np.float64)
    ranks = np.load(os.path.join(workdir, "eval", "revisited_ranks.npy"))
    assert ranks.shape == (3, NUM_DB)
    for q in range(3):
        assert sorted(ranks[q]) == list(range(NUM_DB))
        ordered = scores[q, ranks[q]]
        assert (np.diff(ordered) <= 1e-6).all(), (q, ordered)
    numpy_ranks = np.argsort(-scores, axis=1, kind="stable")
    for q in range(3):
        # Where numpy and exact search differ, it is only within near-ties.
        np.testing.assert_allclose(
            scores[q, ranks[q]], scores[q, numpy_ranks[q]], rtol=0, atol=1e-6
        )
    expected = metrics.revisited_map(ranks, gnd["gnd"])
    assert set(results) == {"easy", "medium", "hard"}
    for protocol in results:
        assert set(results[protocol]) == {"map", "mp@1", "mp@5", "mp@10"}
        for key, value in results[protocol].items():
            assert value == pytest.approx(expected[protocol][key], abs=1e-12), (protocol, key)
        assert 0.0 <= results[protocol]["map"] <= 1.0

    report = json.load(open(os.path.join(workdir, "eval", "revisited.json")))
    assert report["medium"] == pytest.approx(results["medium"])
    assert report["per_query_ap"]["queries"] == gnd["qimlist"]
    np.testing.assert_allclose(report["per_query_ap"]["hard"][:2], expected["hard"]["aps"][:2])
    assert report["per_query_ap"]["hard"][2] is None  # query_c has no hard positives
    assert report["settings"]["step"] == 6  # the trained_demo run (conftest.py)
    assert "medium" in revisited.format_results(results)

    # python -m landmark_jax.evaluate runs it when config.eval.revisited_data_dir is set.
    config.eval.revisited_data_dir = data_dir
    config.eval.retrieval_solution = f"{demo['raw']}/retrieval_solution.csv"
    config.eval.train_split = ""
    config.eval.knn_backend = "exact"
    config.eval.baselines = ()  # extractions of their own, checked in test_evaluate
    config.eval.revisited_resize = "longer_side"
    config.eval.size_multiple = 16
    # Re-ranked: the Revisited table after each step beside the first search's.
    config.eval.rerank = ("dba(n=1, alpha=3)", "alpha_qe(n=2, alpha=3)")
    # SuperGlobal's pooling options reach Revisited's extraction (what they
    # do to a descriptor: test_superglobal_extraction.py); the spy passes
    # the extraction on without them, so no other program is compiled.
    config.eval.gem_plus = True
    passed, real_extract = [], extract.extract

    def spy(model, split, **options):
        passed.append((split, options.pop("superglobal")))
        return real_extract(model, split, **options)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(extract, "extract", spy)  # GLDv2's extraction and Revisited's
        report = evaluation.evaluate(config, workdir)
    assert [split for split, _ in passed] == ["index", "test", "revisited_db", "revisited_query"]
    assert all(options["gem_plus_p"] == 4.6 for _, options in passed)
    written = json.load(open(os.path.join(workdir, "eval", "metrics.json")))
    assert set(report["revisited"]) == set(written["revisited"]) == {"easy", "medium", "hard"}
    assert 0.0 <= written["revisited"]["medium"]["map"] <= 1.0
    stages = written["rerank"]["revisited"]
    assert list(written["rerank"]) == ["retrieval", "revisited"]
    db, q = (
        extract.Embeddings.load(revisited.embeddings_path(workdir, split))
        for split in ("revisited_db", "revisited_query")
    )
    rankings = rerank.rerank_searches(
        q.embeddings, db.embeddings, rerank.parse_steps(config.eval.rerank), NUM_DB, "exact"
    )
    assert list(stages) == [r.label for r in rankings]
    for ranking in rankings:
        want = metrics.revisited_map(ranking.neighbors, gnd["gnd"])
        for protocol in ("easy", "medium", "hard"):
            for key in ("map", "mp@10"):
                assert stages[ranking.label][protocol][key] == pytest.approx(
                    want[protocol][key], abs=1e-12, nan_ok=True
                )
    last = stages[rankings[-1].label]
    assert all(report["revisited"][p]["map"] == last[p]["map"] for p in ("easy", "hard"))
    ranks = np.load(os.path.join(workdir, "eval", "revisited_ranks.npy"))
    np.testing.assert_array_equal(ranks, rankings[-1].neighbors)
    assert "H mP@10" in evaluation.format_metrics(report)
    settings = json.load(open(os.path.join(workdir, "eval", "revisited.json")))["settings"]
    assert settings["superglobal"]["gem_plus_p"] == 4.6
    assert db.settings["superglobal"]["gem_plus_p"] == 4.6
    assert (settings["resize"], settings["image_size"], settings["size_multiple"]) == (
        "longer_side",
        config.image_size,
        16,
    )

    # The GLDv2 embeddings' cache records the resize: a square-resized cache
    # is not reused for aspect-kept extraction.
    cache = os.path.join(workdir, "eval", "embeddings-index-0.npz")
    square = extract.Embeddings.load(cache)
    assert (square.settings["resize"], square.settings["size_multiple"]) == ("square", 16)
    config.eval.resize = "longer_side"
    members = [ensemble.EnsembleMember(workdir, 1.0, None)]
    models = [restored_runs.load_trained_model(config, workdir)]
    kept = evaluation.embed_split(config, workdir, "index", members, models, sharding.create_mesh())
    assert extract.Embeddings.load(cache).settings["resize"] == "longer_side"
    assert list(kept.ids) == list(square.ids)
    assert not np.allclose(kept.embeddings, square.embeddings, atol=1e-6)


def resized_size(h: int, w: int, resize: str, scale: float, image_size=None, multiple=1):
    """The resize rule written out per image (DOLG: round(h * s), round(w * s))."""
    if resize == "native":
        exact = [h * scale, w * scale]
    else:
        target, longer = image_size * scale, max(h, w)
        exact = [target if side == longer else side * target / longer for side in (h, w)]
    return [max(multiple, multiple * round(x / multiple)) for x in exact]


@functools.cache
def _describe_one(module, descriptor: str):
    """jit(variables, images) -> the run's descriptors (model.descriptor), once
    per model: the tests' references then share the programs of each shape."""
    if descriptor == "pooled":
        # The pooled features the model sows before its neck.
        def describe(variables, x):
            _, state = module.apply(variables, x, mutable=["intermediates"])
            return state["intermediates"]["pooled"][0]

        return jax.jit(describe)
    return jax.jit(module.apply)


def one_image_at_a_time(config, workdir, data_dir, split, *, scales, flip, **resize):
    """{id: embedding}: each image of the split alone through the model.

    Decoded from its stored JPEG, resized with tf.image.resize (bilinear) to
    `resized_size`, rounded to uint8, run as a batch of one on one device
    (the run's model.descriptor); views L2-normalised, summed, normalised.
    """
    trained = restored_runs.load_trained_model(config, workdir)
    apply = _describe_one(trained.module, trained.config.model.descriptor)
    variables = jax.device_put(trained.variables, jax.devices()[0])
    out = {}
    for image_id, jpeg in read_split(data_dir, split):
        decoded = tf.io.decode_image(jpeg, channels=3, expand_animations=False)
        total = 0.0
        for scale in scales:
            size = resized_size(*decoded.shape[:2], scale=scale, **resize)
            image = tf.image.resize(decoded, size, method="bilinear").numpy()
            image = np.clip(np.round(image), 0, 255).astype(np.uint8)[None]
            for view in [image, image[:, :, ::-1]] if flip else [image]:
                e = np.asarray(apply(variables, view), np.float64)[0]
                total = total + e / np.linalg.norm(e)
        out[image_id] = total / np.linalg.norm(total)
    return out


def assert_matches(emb: extract.Embeddings, expected: dict, atol=2e-6):
    assert list(emb.ids) == list(expected)  # file order, each image once
    np.testing.assert_allclose(emb.embeddings, np.stack(list(expected.values())), atol=atol)
    np.testing.assert_array_equal(emb.labels, -1)


@pytest.mark.e2e
def test_native_extraction_equals_one_image_at_a_time(revisited_data, trained):
    tiny_set, data_dir = revisited_data
    config, workdir = trained
    config = config.copy_and_resolve_references()
    config.data_dir = data_dir
    options = dict(scales=(1.0, 0.5), flip=True, resize="native")
    # Queries at their exact sizes (3 crops, 3 shapes per scale); the database
    # (12 images 40 px high, 56-71 px wide) with sides rounded to 8 px, which
    # keeps the number of compiled shapes, and the test, small.
    for split, names, multiple in (
        ("revisited_query", "qimlist", 1),
        ("revisited_db", "imlist", 8),
    ):
        emb = extract.extract(
            restored_runs.load_trained_model(config, workdir),
            split,
            batch_size=16,
            size_multiple=multiple,
            **options,
        )
        assert list(emb.ids) == tiny_set["data"][names]
        expected = one_image_at_a_time(
            config, workdir, data_dir, split, multiple=multiple, **options
        )
        assert_matches(emb, expected)
    index = sized_eval_input.read_eval_index(data_dir, "revisited_query")
    assert list(zip(index.heights, index.widths, strict=True)) == [(23, 36), (33, 44), (48, 64)]


@pytest.mark.e2e
def test_batch_rows_padding_and_process_shares_do_not_change_an_embedding(revisited_data, trained):
    _, data_dir = revisited_data
    config, workdir = trained
    config = config.copy_and_resolve_references()
    config.data_dir = data_dir
    split = "revisited_db"
    # Longer side 32 and sides rounded to 16: all 12 images are 16 x 32.
    resize = dict(resize="longer_side", image_size=32, size_multiple=16)
    expected = one_image_at_a_time(
        config,
        workdir,
        data_dir,
        split,
        scales=(1.0,),
        flip=False,
        resize="longer_side",
        image_size=32,
        multiple=16,
    )
    # 16 rows: one batch of 12 images and 4 padding rows; 8 rows: a full batch
    # of 8, then 4 images and 4 padding rows.
    for batch_size in (16, 8):
        emb = extract.extract(
            restored_runs.load_trained_model(config, workdir),
            split,
            batch_size=batch_size,
            **resize,
        )
        assert_matches(emb, expected)

    # Two processes (simulated here): each embeds its shards, the merge puts
    # the rows back in file order, each image exactly once.
    mesh = sharding.create_mesh()
    trained_model = restored_runs.load_trained_model(config, workdir)
    variables = jax.device_put(trained_model.variables, sharding.replicated_sharding(mesh))
    embed = extract.embed_views(trained_model.module, False, trained_model.config.model.descriptor)
    shares = [
        shape_buckets.share_embeddings(
            embed,
            variables,
            data_dir,
            split,
            scales=(1.0,),
            image_size=32,
            resize="longer_side",
            size_multiple=16,
            local_rows=8,
            local_mesh=mesh,
            process_index=p,
            process_count=2,
        )
        for p in range(2)
    ]
    info = data_format.read_split_info(data_dir, split)
    assert [len(s["ids"]) for s in shares] == [sum(info.file_examples[p::2]) for p in range(2)]
    merged = shape_buckets.file_order(shares, info.file_examples)
    assert_matches(
        extract.Embeddings(merged["ids"], merged["embeddings"], merged["labels"]), expected
    )

    # Directly: an image's row is the same beside other images or zero rows.
    images = np.stack(
        list(
            sized_eval_input.create_sized_eval_dataset(
                data_dir, split, np.full((12, 2), [16, 32])
            ).as_numpy_iterator()
        )
    )
    alone = np.zeros((8, 16, 32, 3), np.uint8)
    alone[0] = images[0]
    full = np.asarray(embed(variables, jax.device_put(images[:8], sharding.batch_sharding(mesh))))
    single = np.asarray(embed(variables, jax.device_put(alone, sharding.batch_sharding(mesh))))
    np.testing.assert_allclose(single[0], full[0], atol=1e-6)


def test_a_side_below_a_keras_dynamic_model_minimum_is_raised_to_it(revisited_data):
    """The 23x36 query (scale 1, native) under an EfficientNet with Keras's
    dynamic padding, which takes no side under 32 px (a NaN descriptor with
    XLA's convolution before the minimum; im2col raised a TypeError, and
    test_extract_buckets checks the rule at both lowerings): extracted at
    32x36, the query as resized there alone through the model."""
    import ml_collections

    from landmark_jax.models import factory

    _, data_dir = revisited_data
    model_config = factory.resolve_model_config(
        {
            "name": "global",
            "backbone": "efficientnet_tiny",
            "embedding_dim": 8,
            "padding": "keras_dynamic",
            "conv_lowering": "xla",
        }
    )
    module = factory.create_model(model_config)
    # Random variables (numpy's, not a compiled init): any weights show the
    # minimum side and compare the two paths.
    variables = random_variables(module, (1, 32, 32, 3))
    config = ml_collections.ConfigDict(
        {
            "data_dir": data_dir,
            "image_size": 32,
            "batch_size": 8,
            "val": {"batch_size": None},
            "model": model_config,
        }
    )
    trained_model = extract.TrainedModel(config, "", 0, module, variables, {})
    emb = extract.extract(trained_model, "revisited_query", resize="native")
    assert np.isfinite(emb.embeddings).all()

    apply = jax.jit(module.apply)
    expected = {}
    for image_id, jpeg in read_split(data_dir, "revisited_query"):
        decoded = tf.io.decode_image(jpeg, channels=3, expand_animations=False)
        size = [max(side, 32) for side in decoded.shape[:2]]  # (23, 36) -> (32, 36)
        image = tf.image.resize(decoded, size, method="bilinear").numpy()
        image = np.clip(np.round(image), 0, 255).astype(np.uint8)[None]
        e = np.asarray(apply(variables, image), np.float64)[0]
        expected[image_id] = e / np.linalg.norm(e)
    assert_matches(emb, expected, atol=1e-5)
