"""The builders on URL paths, through TensorFlow's in-memory ram:// filesystem.

ram:// goes through the same tf.io.gfile code as gs://, so a builder that
writes and reads a ram:// folder exactly as it does a local one works on a
bucket too. Each build here is compared with the same build into a local
folder: the same files, the same bytes.

TFDS opens its paths with etils.epath, which has no ram://: tfds_ram
registers it with the tf.io.gfile backend that epath uses for gs://, adding
what TensorFlow's ram:// lacks and a bucket has (recursive delete, folder
rename, replacing a file on write). So TFDS's own file handling (the
`incomplete.*` folder renamed at the end, its shard writer and
dataset_info.json) runs here through tf.io.gfile as on gs://; what it cannot
show is TensorFlow's Cloud Storage client itself (README, "Cloud paths").
"""

import json
import os
import uuid

import pytest
import tfds_ram

from data_pipelines import build_dataset, build_swap, make_demo_dataset
from landmark_jax.data import data_format
from landmark_jax.runtime import file_io

TINY_DEMO = dict(
    num_landmarks=4,
    num_index_landmarks=2,
    max_images_per_landmark=4,
    image_size=32,
    num_non_landmark_references=3,
    num_workers=1,
)
# A derived config of gldv2/full: every split, a val split of a few images.
DATASET, CONFIG = "gldv2/full", "full_val0.25"


@pytest.fixture(scope="module", autouse=True)
def _ram_for_tfds():
    tfds_ram.register()


@pytest.fixture(autouse=True)
def _short_lease_settle(monkeypatch):
    # A build's lease on a URL waits for a second taker; one process here.
    monkeypatch.setattr(build_swap, "LEASE_SETTLE_SECONDS", 0.05)


@pytest.fixture()
def ram():
    """A fresh ram:// folder, deleted afterwards."""
    root = f"ram://{uuid.uuid4().hex}"
    yield root
    file_io.rmtree(root)


@pytest.fixture()
def cwd(tmp_path, monkeypatch):
    """An empty working directory that must stay empty: a URL taken for a local
    path would create a folder named `ram:` there."""
    folder = tmp_path / "cwd"
    folder.mkdir()
    monkeypatch.chdir(folder)
    yield folder
    assert os.listdir(folder) == []


@pytest.fixture(scope="module")
def demo_raw(tmp_path_factory):
    """A tiny demo data set (GLDv2 layout) in a local folder."""
    raw = str(tmp_path_factory.mktemp("demo") / "raw")
    make_demo_dataset.make_demo_dataset(raw, **TINY_DEMO)
    return raw


@pytest.fixture(scope="module")
def local_build(demo_raw, tmp_path_factory):
    """The GLDv2 build of the demo tree into a local folder."""
    return _build(str(tmp_path_factory.mktemp("local")), demo_raw)


def _build(data_dir: str, manual_dir: str, **kwargs) -> str:
    builder, _ = build_dataset.build(
        DATASET, data_dir, manual_dir=manual_dir, num_shards=2, val_fraction=0.25, **kwargs
    )
    return os.fspath(builder.data_dir)


def _files(root: str) -> dict[str, bytes]:
    """Every file under root (local or URL), by path relative to root."""
    found = {}
    pending = [root]
    while pending:
        # A glob, not listdir: ram:// lists `<folder>*`, not `<folder>/*`.
        for path in file_io.glob(file_io.join(pending.pop(), "*")):
            if file_io.isdir(path):
                pending.append(path)
            else:
                found[path[len(root) + 1 :].replace(os.sep, "/")] = file_io.read_bytes(path)
    return found


def _assert_same_build(local: str, remote: str, manual_dirs: tuple[str, str]) -> None:
    """The same files, byte for byte, but for what the metadata records of the
    build itself (its id, and the manual dir it read); the project's readers
    read the same splits and counts back."""
    local_files, remote_files = _files(local), _files(remote)
    assert sorted(remote_files) == sorted(local_files)
    assert any(".tfrecord-" in name for name in local_files)
    for name, data in local_files.items():
        if name != "metadata.json":
            assert remote_files[name] == data, name
    meta = {k: json.loads(v["metadata.json"]) for k, v in (("l", local_files), ("r", remote_files))}
    for key, manual_dir in zip("lr", manual_dirs, strict=True):
        assert meta[key].pop(data_format.BUILD_ID)
        assert meta[key]["source"].pop("manual_dir") == manual_dir
    assert meta["l"] == meta["r"]
    for split in ("train", "val", "index", "test", "nonlandmark"):
        remote_split = data_format.read_split_info(remote, split)
        local_split = data_format.read_split_info(local, split)
        assert remote_split.num_examples == local_split.num_examples > 0
        assert remote_split.file_examples == local_split.file_examples
        assert all(f.startswith(remote + "/") for f in remote_split.files)
    remote_map, local_map = data_format.read_label_map(remote), data_format.read_label_map(local)
    assert remote_map.num_classes == local_map.num_classes == TINY_DEMO["num_landmarks"]
    assert (remote_map.train_val_counts == local_map.train_val_counts).all()


def test_demo_data_set_in_ram_equals_the_local_one(demo_raw, ram, cwd):
    make_demo_dataset.make_demo_dataset(f"{ram}/raw", **TINY_DEMO)
    remote, local = _files(f"{ram}/raw"), _files(demo_raw)
    assert sorted(remote) == sorted(local)
    assert all(remote[name] == data for name, data in local.items())
    assert any(name.endswith(".jpg") for name in remote)


@pytest.mark.e2e
def test_gldv2_build_into_ram_equals_a_local_build(demo_raw, local_build, ram, cwd, tmp_path):
    # The default worker count for a ram:// data dir is one process.
    remote = _build(f"{ram}/tfds", demo_raw)
    assert remote == f"{ram}/tfds/gldv2/{CONFIG}/1.0.0"
    _assert_same_build(local_build, remote, (demo_raw, demo_raw))
    # The folder above the build finds it, as a config's data_dir may name it.
    assert data_format.find_build(f"{ram}/tfds/gldv2") == remote
    # Reused as it is, then rebuilt beside it and moved into its place.
    builder, reused = build_dataset.build(DATASET, f"{ram}/tfds", val_fraction=0.25)
    assert reused
    build_id = data_format.open_build(remote).info.metadata[data_format.BUILD_ID]
    again = _build(f"{ram}/tfds", demo_raw, overwrite=True)
    assert again == remote
    assert data_format.open_build(remote).info.metadata[data_format.BUILD_ID] != build_id
    config_dir = f"{ram}/tfds/gldv2/{CONFIG}"
    assert file_io.glob(f"{config_dir}/*") == [remote]
    # A rebuild that fails leaves it exactly as it was.
    before = _files(remote)
    for name in os.listdir(demo_raw):
        if name != "train_clean.csv":
            os.symlink(os.path.join(demo_raw, name), tmp_path / name)
    with pytest.raises(FileNotFoundError, match="train_clean.csv not found"):
        _build(f"{ram}/tfds", str(tmp_path), overwrite=True)
    assert _files(remote) == before
    assert file_io.glob(f"{config_dir}/*") == [remote]


@pytest.mark.e2e
def test_gldv2_build_reads_its_inputs_from_ram(demo_raw, local_build, ram, cwd, tmp_path):
    for name, data in _files(demo_raw).items():
        file_io.write_bytes(f"{ram}/raw/{name}", data)
    # A local data dir, default worker count: one process, which alone sees
    # the ram:// images.
    local = _build(str(tmp_path / "tfds"), f"{ram}/raw")
    # A URL is recorded as is, not made absolute as a local path would be.
    _assert_same_build(local_build, local, (demo_raw, f"{ram}/raw"))


@pytest.mark.e2e
def test_worker_processes_on_ram_are_refused(demo_raw, ram, cwd, tmp_path):
    with pytest.raises(ValueError, match=rf"--data_dir={ram}/tfds.*num_workers=1"):
        _build(f"{ram}/tfds", demo_raw, num_workers=2)
    for name, data in _files(demo_raw).items():
        file_io.write_bytes(f"{ram}/raw/{name}", data)
    with pytest.raises(ValueError, match=rf"--manual_dir={ram}/raw.*num_workers=1"):
        _build(str(tmp_path / "tfds"), f"{ram}/raw", num_workers=2)
    with pytest.raises(ValueError, match=f"{ram}/demo.*num_workers=1"):
        make_demo_dataset.make_demo_dataset(f"{ram}/demo", **{**TINY_DEMO, "num_workers": 2})
    # Refused before any image: no build, no demo folder.
    assert not file_io.glob(f"{ram}/tfds/gldv2/{CONFIG}/*")
    assert not os.listdir(tmp_path / "tfds" / "gldv2" / CONFIG)
    assert not file_io.exists(f"{ram}/demo")
