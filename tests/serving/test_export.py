"""The exported SavedModel gives the project's own descriptors, run by TensorFlow alone.

Three exports share one TensorFlow-only process (experiments/serving/
score_saved_model.py, which refuses to import JAX or landmark_jax): the
trained demo run through the real `python -m landmark_jax.export` (its
mAP@100 through the SavedModel against `evaluate`'s), a DOLG (native sizes,
two scales, sides rounded to multiples of 16, SuperGlobal's pooling options
on), and a weighted 2-member
ensemble of an EfficientNet with Keras's padding (aspect kept, sides raised
to its 32 px minimum) and a ResNet with the caffe convention whose large
head must stay out; the last three runs are written here with random
weights. Each descriptor is compared with `evaluate`'s embedding of the
same image (evaluation.embed_split). (eval.flip's views are
extract.embed_views', which the export calls: tested with the evaluation.)
"""

import json
import os
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest
import tensorflow as tf
from configs_for_tests import REPO, load_config

from landmark_jax.data import input_pipeline, sized_eval_input
from landmark_jax.models.factory import create_model, resolve_model_config
from landmark_jax.retrieval import evaluation, restored_runs
from landmark_jax.runtime import sharding
from landmark_jax.serving import descriptor_function, saved_model
from landmark_jax.workdir import checkpoint_saving, checkpointing, run_config

from backbone_variables import random_variables
from cpu_devices import subprocess_env

pytestmark = pytest.mark.e2e

SCORER = f"{REPO}/experiments/serving/score_saved_model.py"
# What the TF-only process embeds with each export: every aspect-kept size
# compiles a program of its own there, so the DOLG (two native scales) embeds 2.
SCORED = {"demo": "index,test", "dolg": "index:2", "ensemble": "index:4"}

# name: (model keys, image size, eval keys, head classes)
RUNS = {
    "efficientnet": (
        {"name": "global", "backbone": "efficientnet_tiny", "padding": "keras_dynamic"},
        40,
        {"resize": "longer_side", "scales": (0.75,), "size_multiple": 8},
        10,
    ),
    "dolg": (
        {
            "name": "dolg",
            "backbone": "resnet_tiny",
            "dolg": {
                "dilations": (1, 2, 3),
                "branch_channels": 8,
                "local_dim": 16,
                "global_dim": 16,
            },
        },
        40,
        # With SuperGlobal's pooling (superglobal_extraction): GeM+ and
        # Regional-GeM in the global branch, ReLU+ in the ResNet, Scale-GeM.
        {
            "resize": "native",
            "scales": (0.7071, 1.0),
            "size_multiple": 16,
            "gem_plus": True,
            "regional_gem": True,
            "scale_gem": True,
            "relu_plus": True,
        },
        10,
    ),
    # 16 x 100,000 head weights: 6.4 MB, 12x that model, so a head in the export shows.
    "caffe_resnet": (
        {"name": "global", "backbone": "resnet_tiny", "input_normalization": "caffe"},
        36,
        {},
        100_000,
    ),
}


def write_run(workdir, base, model_keys, image_size, eval_keys, head_classes, seed):
    """A workdir as the trainer leaves it (config.json, a step-0 checkpoint),
    its model's weights random (numpy, no compiled init)."""
    config = ml_collections.ConfigDict(base.to_dict())
    config.model = resolve_model_config({"embedding_dim": 16, **model_keys})
    config.image_size = image_size
    config.num_classes = head_classes
    for key, value in eval_keys.items():
        config.eval[key] = value
    module = create_model(config.model)
    variables = random_variables(module, (1, image_size, image_size, 3), seed=seed)
    rng = np.random.default_rng(seed)
    head = {"kernel": rng.normal(size=(16, head_classes)).astype(np.float32)}
    state = {
        "params": {"model": variables["params"], "head": head},
        "batch_stats": {"model": variables["batch_stats"]},
        "step": np.int32(0),
    }
    manager = checkpointing.create_manager(workdir, keep=1, async_save=False)
    checkpoint_saving.save(manager, 0, state)
    manager.wait_until_finished()
    manager.close()
    run_config.write_run_config(config, workdir)
    return workdir


@pytest.fixture(scope="module")
def exported(demo, trained_demo, tmp_path_factory):
    """{name: (workdir or None, export folder, export info)} and the scorer's
    JSON line and embeddings of each.

    The CLI's export is lowered for every platform, as users get it; the
    others for the CPU only (each platform is one more lowering of every
    signature).
    """
    root = tmp_path_factory.mktemp("export")
    base = run_config.read_run_config(trained_demo)
    base.data_dir = demo["full"]
    runs = {
        name: write_run(str(root / name), base, *spec, seed=i)
        for i, (name, spec) in enumerate(RUNS.items())
    }
    out = {}
    # The trained demo run through the real program (its own config.json),
    # started first: its start-up overlaps the exports below.
    # Over an older export holding a file of the user's: --overwrite moves it aside.
    (root / "demo_export").mkdir()
    (root / "demo_export" / "mine.txt").write_text("keep me")
    cli = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "landmark_jax.export",
            f"--workdir={trained_demo}",
            f"--output={root / 'demo_export'}",
            "--overwrite",
        ],
        env=subprocess_env(8),
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    # The ensemble: the EfficientNet at 40 px (weight 1.0) and the caffe
    # ResNet at 36 (0.55), both as the EfficientNet run's eval block says.
    ensemble_config = base_of(runs["efficientnet"])
    ensemble_config.eval.ensemble = [
        {"workdir": runs["efficientnet"], "weight": 1.0, "image_size": 40},
        {"workdir": runs["caffe_resnet"], "weight": 0.55, "image_size": 36},
    ]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(saved_model, "PLATFORMS", ("cpu",))
        path = str(root / "dolg_export")
        out["dolg"] = (
            runs["dolg"],
            path,
            saved_model.export(base_of(runs["dolg"]), runs["dolg"], path),
        )
        # jax_export/ is tested on the DOLG's: the ensemble's is not written.
        patch.setattr(saved_model, "_write_jax_export", lambda members, path: None)
        path = str(root / "ensemble_export")
        out["ensemble"] = (None, path, saved_model.export(ensemble_config, None, path))
    stdout, stderr = cli.communicate(timeout=300)
    assert cli.returncode == 0, stderr[-3000:]
    assert f"wrote {root / 'demo_export'}/" in stdout
    out["cli_stdout"] = stdout
    with open(root / "demo_export" / saved_model.INFO_FILE) as f:
        out["demo"] = (trained_demo, str(root / "demo_export"), json.load(f))

    # One TensorFlow-only process embeds the index split with every export,
    # and the test split with the demo run's (its mAP@100).
    names = [n for n in out if n != "cli_stdout"]
    embeddings = root / "tf_embeddings"
    scorer = subprocess.run(
        [
            sys.executable,
            SCORER,
            f"--data={demo['raw']}",
            f"--embeddings_out={embeddings}",
            "--batch_checks=1",
            *[f"--saved_model={out[n][1]}" for n in names],
            *[f"--splits={SCORED[n]}" for n in names],
        ],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
    )
    assert scorer.returncode == 0, scorer.stderr[-3000:]
    lines = scorer.stdout.splitlines()[-len(names) :]
    reports = {n: json.loads(line) for n, line in zip(names, lines, strict=True)}
    tf_rows = {
        n: {
            split: np.load(embeddings / f"{i}-{split}.npz")
            for split in (("index", "test") if n == "demo" else ("index",))
        }
        for i, n in enumerate(names)
    }
    return out, reports, tf_rows


def base_of(workdir):
    return run_config.read_run_config(workdir)


def evaluation_rows(demo, config, workdir, split, tmp_path):
    """`evaluate`'s embeddings of a split for a config's members (its own code path)."""
    config = config.copy_and_resolve_references()
    config.data_dir = demo["full"]
    members, models = restored_runs.restore_members(config, workdir)
    return evaluation.embed_split(
        config, str(tmp_path), split, members, models, sharding.create_mesh()
    )


@pytest.mark.parametrize("name", ["dolg", "ensemble", "demo"])
def test_the_saved_model_gives_evaluate_s_descriptors(exported, demo, tmp_path, name):
    """Square and non-square images of several sizes (the demo index: 8 images
    of 8 sizes, as many as SCORED says): cosine > 0.99999 and 1e-5 per
    component against evaluate's rows. The ensemble's second member is the
    caffe-convention ResNet."""
    out, reports, tf_rows = exported
    workdir, _, info = out[name]
    if name == "ensemble":
        config = run_config.read_run_config(info["members"][0]["workdir"])
        config.eval.ensemble = [
            {"workdir": m["workdir"], "weight": m["weight"], "image_size": m["image_size"]}
            for m in info["members"]
        ]
    else:
        config = run_config.read_run_config(workdir)
    reference = evaluation_rows(demo, config, workdir, "index", tmp_path)
    rows = tf_rows[name]["index"]
    order = {image_id: i for i, image_id in enumerate(reference.ids)}
    expected = reference.embeddings[[order[i] for i in rows["ids"]]]
    got = rows["descriptors"]
    count = {"demo": 8, "dolg": 2, "ensemble": 4}[name]
    assert got.shape == expected.shape == (count, info["descriptor_dim"])
    assert np.abs(got - expected).max() < 1e-5
    cosine = (
        (got * expected).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(expected, axis=1)
    )
    assert cosine.min() > 0.99999
    assert reports[name]["batch_max_abs_diff"] < 1e-5  # serving_batch = serving_default
    if name == "ensemble":
        # Member by member: unit parts times their weights, as GLR2020's export.
        norms = [np.linalg.norm(got[:, :16], axis=1), np.linalg.norm(got[:, 16:], axis=1)]
        np.testing.assert_allclose(norms[0], 1.0, atol=1e-5)
        np.testing.assert_allclose(norms[1], 0.55, atol=1e-5)
        assert [
            (m["model"]["backbone"], m["model"]["padding"], m["model"]["input_normalization"])
            for m in info["members"]
        ] == [("efficientnet_tiny", "keras_dynamic", "imagenet"), ("resnet_tiny", None, "caffe")]


def test_the_demo_run_s_map_through_the_saved_model_is_evaluate_s(exported, demo, tmp_path):
    """The trained demo run exported by the CLI and scored as GLR2020's scorer
    did (TF alone, Euclidean kNN, GLDv2 mAP@100): evaluate's figure within 0.002."""
    out, reports, _ = exported
    workdir = str(tmp_path / "run")
    import shutil

    shutil.copytree(out["demo"][0], workdir, ignore=shutil.ignore_patterns("eval"))
    config = load_config("demo", "smoke")
    config.data_dir = demo["full"]
    config.eval.retrieval_solution = f"{demo['raw']}/retrieval_solution.csv"
    config.eval.recognition_solution = ""
    config.eval.baselines = ()
    metrics = evaluation.evaluate(config, workdir)
    assert reports["demo"]["queries"] == metrics["retrieval_queries"]
    assert abs(reports["demo"]["map@100"] - metrics["map@100"]) < 0.002


def test_the_export_holds_backbone_and_neck_not_the_head(exported):
    """variables/ is the members' parameters within 10%: the caffe member's
    6.4 MB head, 5x the two models, is left out; the graph (saved_model.pb) is
    apart and does not grow with the parameters."""
    out, _, _ = exported
    _, path, info = out["ensemble"]
    model_bytes = head_bytes = 0
    for member in info["members"]:
        stage = checkpointing.load_stage(member["workdir"])
        for tree in (stage["params"]["model"], stage["batch_stats"]["model"]):
            model_bytes += sum(x.nbytes for x in jax.tree.leaves(tree))
        head_bytes += sum(x.nbytes for x in jax.tree.leaves(stage["params"]["head"]))
    assert head_bytes > 5 * model_bytes
    variables = sum(
        os.path.getsize(os.path.join(path, "variables", f))
        for f in os.listdir(os.path.join(path, "variables"))
    )
    assert abs(variables - model_bytes) < 0.1 * model_bytes
    assert info["descriptor_dim"] == 16 + 16


def test_the_jax_export_runs_without_the_package(exported, demo):
    """jax_export/ reloaded with jax and numpy only (as export_info.json says):
    the DOLG's function at two native scales gives the SavedModel's rows."""
    out, _, tf_rows = exported
    _, path, info = out["dolg"]
    with open(os.path.join(path, saved_model.JAX_DIR, saved_model.JAX_FUNCTION), "rb") as f:
        function = jax.export.deserialize(bytearray(f.read()))
    archive = np.load(os.path.join(path, saved_model.JAX_DIR, saved_model.JAX_PARAMS))
    params = [archive[k] for k in sorted(archive.files)]
    members = [descriptor_function.exported_member(*_restored(out["dolg"][0]))]
    raw, rows = demo["raw"], tf_rows["dolg"]["index"]
    for image_id, expected in zip(rows["ids"], rows["descriptors"], strict=True):
        encoded = tf.io.read_file(
            f"{raw}/index/{image_id[0]}/{image_id[1]}/{image_id[2]}/{image_id}.jpg"
        )
        image = input_pipeline.decode_image(encoded)[tf.newaxis]
        images = [
            [x.numpy() for x in per] for per in descriptor_function.member_inputs(image, members)
        ]
        got = np.asarray(function.call(params, images))[0]
        np.testing.assert_allclose(got, expected, atol=1e-5)
    assert info["jax_export"]["images"][0][0]["rule"]["resize"] == "native"


def _restored(workdir):
    config = run_config.read_run_config(workdir)
    members, models = restored_runs.restore_members(config, workdir)
    return models[0], members[0], config


def test_tf_sizes_are_extraction_s(tmp_path):
    """tf_eval_image_size (the SavedModel's resize) equals eval_image_sizes on
    random sizes in every mode, multiple and minimum side."""
    rng = np.random.default_rng(0)
    heights, widths = rng.integers(1, 900, 60), rng.integers(1, 900, 60)
    heights[:4], widths[:4] = [7, 64, 33, 100], [7, 31, 33, 5]
    for resize in sized_eval_input.RESIZE_MODES:
        for scale, multiple, min_side in [(1.0, 1, 1), (0.7071, 1, 32), (1.4142, 16, 32)]:
            options = dict(resize=resize, image_size=37, scale=scale, multiple=multiple)
            expected = sized_eval_input.eval_image_sizes(
                heights, widths, min_side=min_side, **options
            )
            size = tf.function(
                lambda h, w, options=options, min_side=min_side: (
                    sized_eval_input.tf_eval_image_size(h, w, min_side=min_side, **options)
                )
            )
            got = [
                np.asarray(size(tf.constant(h), tf.constant(w)))
                for h, w in zip(heights, widths, strict=True)
            ]
            np.testing.assert_array_equal(
                np.stack(got), expected, err_msg=f"{resize} {scale} {multiple}"
            )


def test_bad_input_is_named(exported, trained_demo, tmp_path):
    out, _, _ = exported
    config = run_config.read_run_config(trained_demo)
    existing = out["ensemble"][1]
    with pytest.raises(FileExistsError, match=f"{existing} exists: .*--overwrite"):
        saved_model.export(config, trained_demo, existing)
    # A workdir that has written its config but no checkpoint yet.
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    run_config.write_run_config(config, str(unfinished))
    with pytest.raises(FileNotFoundError, match="nothing to export: no checkpoint in"):
        saved_model.export(config, str(unfinished), str(tmp_path / "a"))
    missing = tmp_path / "no_such_run"
    ens = config.copy_and_resolve_references()
    ens.eval.ensemble = [
        {"workdir": trained_demo, "weight": 1.0},
        {"workdir": str(missing), "weight": 0.5},
    ]
    with pytest.raises(FileNotFoundError, match=str(missing)):
        saved_model.export(ens, None, str(tmp_path / "b"))
    with pytest.raises(ValueError, match=r"--descriptor_dim=2048, but the model\(s\) give 256"):
        saved_model.export(config, trained_demo, str(tmp_path / "c"), expected_dim=2048)
    assert not any((tmp_path / n).exists() for n in "abc")


def test_overwrite_moves_the_old_export_aside(exported):
    """--overwrite (the CLI's run): the new export in place, the old one intact
    where the message says, no staging folder left behind."""
    out, _, _ = exported
    path = out["demo"][1]
    (line,) = [x for x in out["cli_stdout"].splitlines() if x.startswith("moved the previous")]
    aside = line.rsplit(" ", 1)[1]
    assert os.path.dirname(aside) == os.path.dirname(path)
    with open(os.path.join(aside, "mine.txt")) as f:
        assert f.read() == "keep me"
    assert not os.path.exists(os.path.join(path, "mine.txt"))
    assert os.path.exists(os.path.join(path, "saved_model.pb"))
    assert [n for n in os.listdir(os.path.dirname(path)) if "staging" in n] == []
