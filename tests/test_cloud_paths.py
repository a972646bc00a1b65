"""A run whose workdir is in Cloud Storage and whose data folder is not on disk.

The workdir is `gs://` on a Cloud Storage emulator (gcp-storage-emulator,
served on loopback): Orbax writes the checkpoints there through TensorStore's
GCS driver and epath, and the project's own files (config.json,
metrics.jsonl, TensorBoard events, evaluation outputs) through file_io.
TensorFlow's GCS client cannot be pointed at an emulator, so the data set (a
TFDS build) lives in TensorFlow's in-memory `ram://` filesystem instead, read
by tf.data, file_io and TFDS (through etils.epath, taught ram:// by
tfds_ram.py) through tf.io.gfile, the code that reads gs:// data sets. The
run (the train program) is killed with SIGKILL after a checkpoint, resumed
in the test's process, evaluated, and checked
file by file; nothing may appear on the local disk.
"""

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from configs_for_tests import REPO, load_config, set_keys

from landmark_jax import trainer
from landmark_jax.retrieval import evaluation
from landmark_jax.runtime import file_io
from landmark_jax.workdir import metric_writer

from cpu_devices import subprocess_env

BUCKET = "landmark-test"
WORKDIR = f"gs://{BUCKET}/runs/demo"
RAM_DATA = "ram://cloud-paths-test/data"


def _add_generation_header(server_module, objects) -> None:
    """Makes the emulator's downloads carry `x-goog-generation`, as GCS's do.

    TensorStore (Orbax's array store) reads an object's generation from that
    header and rejects a download without it; gcp-storage-emulator sends the
    generation in the object's JSON metadata only.
    """
    download = objects.download

    def download_with_generation(request, response, storage, *args, **kwargs):
        download(request, response, storage, *args, **kwargs)
        try:
            obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
        except Exception:  # not found: the 404 stands as it is
            return
        response["x-goog-generation"] = obj["generation"]

    objects.download = download_with_generation  # objects.get(alt=media) calls it
    for _, handlers in server_module.HANDLERS:
        for method, handler in list(handlers.items()):
            if handler is download:
                handlers[method] = download_with_generation


@pytest.fixture(scope="module")
def emulator():
    """An in-memory Cloud Storage emulator and the variables that point every client at it."""
    from gcp_storage_emulator import server as server_module
    from gcp_storage_emulator.handlers import objects
    from gcp_storage_emulator.server import create_server

    _add_generation_header(server_module, objects)

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = create_server("127.0.0.1", port, in_memory=True, default_bucket=BUCKET)
    server.start()
    url = f"http://127.0.0.1:{port}"
    variables = {
        "STORAGE_EMULATOR_HOST": url,  # gcsfs: file_io and Orbax's epath
        "TENSORSTORE_GCS_HTTP_URL": url,  # Orbax's array data
        "EPATH_USE_TF": "0",  # epath through gcsfs, not TensorFlow's client
        "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",  # no gRPC bucket probe
    }
    from etils.epath import gpath

    with pytest.MonkeyPatch.context() as mp:
        for key, value in variables.items():
            mp.setenv(key, value)
        # Both cache their choice of client: made again under these variables.
        file_io._backend_named.cache_clear()
        gpath._is_tf_installed.cache_clear()
        yield variables
    file_io._backend_named.cache_clear()
    gpath._is_tf_installed.cache_clear()
    server.stop()


def _objects(prefix: str) -> list[str]:
    """Every object under a gs:// prefix, relative to it."""
    import gcsfs

    fs = gcsfs.GCSFileSystem(token="anon", use_listings_cache=False)
    root = prefix.removeprefix("gs://").rstrip("/") + "/"
    return sorted(p.removeprefix(root) for p in fs.find(root))


def _losses(workdir: str) -> dict[int, float]:
    return {row["step"]: row["loss"] for row in metric_writer.read_rows(workdir)}


@pytest.mark.e2e
def test_gs_workdir_and_ram_data_train_resume_and_evaluate(
    demo, reference_losses, emulator, tmp_path, monkeypatch, caplog
):
    # Train in a subprocess (the train program) from an empty working folder
    # and kill it after its step-3 checkpoint is committed.
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    env = subprocess_env(
        8, **emulator, PYTHONPATH=os.pathsep.join([REPO, os.path.join(REPO, "tests", "helpers")])
    )
    cmd = [
        sys.executable,
        os.path.join(REPO, "tests", "helpers", "cloud_train.py"),
        demo["full"],
        RAM_DATA,
        f"--config={os.path.join(REPO, 'configs', 'demo.py')}:smoke",
        f"--workdir={WORKDIR}",
        f"--config.data_dir={RAM_DATA}",
        "--config.total_steps=8",
        "--config.log_every_steps=1",
        "--config.checkpoint_every_steps=3",
        "--config.optimizer.schedule=constant",
    ]
    log = tmp_path / "killed.log"
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=f, stderr=subprocess.STDOUT)
        deadline = time.time() + 300
        while "checkpoints/3/commit_success.txt" not in _objects(WORKDIR):
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.time() < deadline, "training did not reach its step-3 checkpoint"
            time.sleep(0.2)
        proc.send_signal(signal.SIGKILL)
        proc.wait()

    # Run it again, here, from the same empty folder: it resumes. The data
    # folder is copied into this process's ram://, under the name the
    # killed run recorded in config.json.
    import tfds_ram

    from cloud_train import copy_folder

    tfds_ram.register()
    copy_folder(demo["full"], RAM_DATA)
    monkeypatch.chdir(cwd)
    config = set_keys(
        load_config("demo", "smoke"),
        data_dir=RAM_DATA,
        total_steps=8,
        log_every_steps=1,
        checkpoint_every_steps=3,
        **{"optimizer.schedule": "constant"},
    )
    with caplog.at_level(logging.INFO):
        trainer.train_and_evaluate(config, WORKDIR)
    assert "Resumed gs://" in caplog.text
    # The same losses as the same 8 steps on local paths in one go.
    got = _losses(WORKDIR)
    assert sorted(got) == list(range(1, 9))
    np.testing.assert_allclose([got[s] for s in got], [reference_losses[s] for s in got], rtol=1e-5)

    # Evaluate, from the same folder.
    eval_config = load_config("demo", "smoke")
    eval_config.data_dir = RAM_DATA
    eval_config.eval.retrieval_solution = f"{demo['raw']}/retrieval_solution.csv"
    eval_config.eval.recognition_solution = f"{demo['raw']}/recognition_solution.csv"
    eval_config.eval.baselines = ()  # extractions that read nothing more from the bucket
    metrics = evaluation.evaluate(eval_config, WORKDIR)
    assert 0.0 <= metrics["map@100"] <= 1.0 and 0.0 <= metrics["gap"] <= 1.0

    objects = _objects(WORKDIR)
    for name in (
        "config.json",
        "metrics.jsonl",
        "checkpoints/6/commit_success.txt",
        "checkpoints/8/commit_success.txt",
        "checkpoints/8/integrity.json",  # the step's file digests, in the bucket too
        "eval/metrics.json",
        "eval/retrieval_submission.csv",
        "eval/recognition_submission.csv",
        "eval/gallery.png",
        "eval/embeddings-index-0.npz",
        "eval/embeddings-test-0.npz",
    ):
        assert name in objects, (name, objects)
    # Two run segments (killed, resumed): two TensorBoard event files.
    assert sum(o.startswith("tensorboard/events.out.tfevents.") for o in objects) == 2
    saved = json.loads(file_io.read_text(f"{WORKDIR}/eval/metrics.json"))
    assert saved["map@100"] == pytest.approx(metrics["map@100"])
    assert json.loads(file_io.read_text(f"{WORKDIR}/config.json"))["data_dir"] == RAM_DATA
    # Exported from the bucket into the bucket (staged on the local disk in
    # the system's temp folder, then copied; the CPU's lowering only).
    from landmark_jax.serving import saved_model

    monkeypatch.setattr(saved_model, "PLATFORMS", ("cpu",))
    info = saved_model.export(eval_config, WORKDIR, f"gs://{BUCKET}/export")
    exported = _objects(f"gs://{BUCKET}/export")
    assert {"saved_model.pb", "export_info.json", "jax_export/params.npz"} <= set(exported)
    assert any(o.startswith("variables/variables.data") for o in exported), exported
    assert info["members"][0]["workdir"] == WORKDIR and info["output"] == f"gs://{BUCKET}/export"
    # Nothing landed on the local disk (no folder named gs: or ram:).
    assert sorted(os.listdir(cwd)) == []
    assert not any(os.path.exists(os.path.join(REPO, d)) for d in ("gs:", "ram:"))


@pytest.mark.e2e
def test_a_workdir_orbax_cannot_write_is_named(demo, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = set_keys(load_config("demo", "smoke"), data_dir=demo["full"], total_steps=1)
    with pytest.raises(ValueError, match=r"ram://elsewhere/run: Orbax checkpoints go to"):
        trainer.train_and_evaluate(config, "ram://elsewhere/run")
    assert os.listdir(tmp_path) == []


def test_backbone_checkpoint_in_a_bucket_round_trips(emulator, tmp_path, monkeypatch):
    """keras_import's output (Orbax variables + backbone.json) written to and
    read from gs://, as `init.backbone` reads it."""
    from landmark_jax.models import backbone_checkpoint, backbones

    from backbone_variables import random_variables

    monkeypatch.chdir(tmp_path)
    module = backbones.create_backbone("efficientnet_tiny", input_normalization="imagenet")
    variables = random_variables(module, (1, 32, 32, 3))
    path = f"gs://{BUCKET}/weights/efficientnet_tiny"
    backbone_checkpoint.save_backbone_checkpoint(
        path,
        "efficientnet_tiny",
        module,
        variables,
        {"test": "random"},
        input_normalization_name="imagenet",
    )
    with pytest.raises(ValueError, match="already holds a checkpoint"):
        backbone_checkpoint.check_output_is_new(path)
    loaded_module, loaded = backbone_checkpoint.load_backbone(path)
    assert loaded_module.input_scale == module.input_scale
    for (key, want), got in zip(
        jax.tree_util.tree_leaves_with_path(variables),
        jax.tree_util.tree_leaves(loaded),
        strict=True,
    ):
        np.testing.assert_array_equal(got, want, err_msg=str(key))
    assert "weights/efficientnet_tiny/backbone.json" in _objects(f"gs://{BUCKET}")
    assert os.listdir(tmp_path) == []
