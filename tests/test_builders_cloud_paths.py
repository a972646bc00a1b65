"""The offline builders on URL paths, through TensorFlow's in-memory ram:// filesystem.

ram:// goes through the same tf.io.gfile code as gs://, so a builder that
writes and reads a ram:// folder exactly as it does a local one works on a
bucket too. Each build here is compared with the same build into a local
folder: the same files, the same bytes, the same dataset_info.json.

Two quirks of TensorFlow's ram:// (2.20) that gs:// does not have, which
file_io works around: listing a folder also lists the siblings that share its
name as a prefix, and rewriting a file appends to it (the second split built
into one folder checks that).
"""

import os
import uuid

import pytest
from test_revisited import make_tiny_set

from data_pipelines import gldv2_to_tfrecord, make_demo_dataset, revisited_to_tfrecord
from landmark_jax import data_format, file_io

TINY_DEMO = dict(
    num_landmarks=4,
    num_index_landmarks=2,
    max_images_per_landmark=4,
    image_size=32,
    num_non_landmark_references=3,
    num_workers=1,
)


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


def _assert_same_data_folder(local: str, remote: str, splits) -> dict:
    """The two folders hold the same files, byte for byte, but for the sources
    that dataset_info.json records; the splits read back the same."""
    local_files, remote_files = _files(local), _files(remote)
    assert sorted(remote_files) == sorted(local_files)
    for name, data in local_files.items():
        if name != data_format.DATASET_INFO:
            assert remote_files[name] == data, name
    info = file_io.read_json(file_io.join(remote, data_format.DATASET_INFO))
    local_info = file_io.read_json(file_io.join(local, data_format.DATASET_INFO))
    assert {k: v for k, v in info.items() if k != "sources"} == {
        k: v for k, v in local_info.items() if k != "sources"
    }
    assert set(info["sources"]) == set(local_info["sources"])
    for split in splits:
        remote_split = data_format.read_split_info(remote, split)
        local_split = data_format.read_split_info(local, split)
        assert remote_split.num_examples == local_split.num_examples > 0
        assert remote_split.file_examples == local_split.file_examples
        assert [file_io.basename(f) for f in remote_split.files] == [
            os.path.basename(f) for f in local_split.files
        ]
        assert all(f.startswith(remote + "/") for f in remote_split.files)
    return info


def test_demo_data_set_in_ram_equals_the_local_one(demo_raw, ram, cwd):
    make_demo_dataset.make_demo_dataset(f"{ram}/raw", **TINY_DEMO)
    remote, local = _files(f"{ram}/raw"), _files(demo_raw)
    assert sorted(remote) == sorted(local)
    assert all(remote[name] == data for name, data in local.items())
    assert any(name.endswith(".jpg") for name in remote)


def _build_train(raw: str, out: str) -> None:
    gldv2_to_tfrecord.build_split(
        "train",
        f"{raw}/train.csv",
        f"{raw}/train",
        out,
        2,
        clean_csv=f"{raw}/train_clean.csv",
        val_fraction=0.25,
        num_workers=1,
    )


def _build_index(raw: str, out: str, num_workers: int | None = 1) -> None:
    gldv2_to_tfrecord.build_split(
        "index", f"{raw}/index.csv", f"{raw}/index", out, 2, num_workers=num_workers
    )


def test_gldv2_to_tfrecord_into_ram_equals_a_local_build(demo_raw, ram, cwd, tmp_path):
    local, remote = str(tmp_path / "local"), f"{ram}/data"
    for out in (local, remote):
        _build_train(demo_raw, out)
    info = _assert_same_data_folder(local, remote, ("train", "val"))
    assert info["sources"] == file_io.read_json(f"{local}/{data_format.DATASET_INFO}")["sources"]
    assert info["sources"]["train"]["csv"] == os.path.abspath(f"{demo_raw}/train.csv")
    remote_map, local_map = data_format.read_label_map(remote), data_format.read_label_map(local)
    assert remote_map.num_classes == local_map.num_classes == TINY_DEMO["num_landmarks"]
    assert (remote_map.counts == local_map.counts).all()
    assert (remote_map.train_val_counts == local_map.train_val_counts).all()


def test_gldv2_to_tfrecord_reads_its_inputs_from_ram(demo_raw, ram, cwd, tmp_path):
    # Inputs on the URL filesystem too: CSVs and the image tree.
    for name, data in _files(demo_raw).items():
        file_io.write_bytes(f"{ram}/raw/{name}", data)
    local, remote = str(tmp_path / "local"), f"{ram}/data"
    for raw, out in ((demo_raw, local), (f"{ram}/raw", remote)):
        _build_index(raw, out)
    info = _assert_same_data_folder(local, remote, ("index",))
    # A URL is recorded as is, not made absolute as a local path would be.
    assert info["sources"]["index"]["csv"] == f"{ram}/raw/index.csv"


def test_second_split_into_the_same_ram_folder(demo_raw, ram, cwd):
    remote = f"{ram}/data"
    _build_train(demo_raw, remote)
    _build_index(demo_raw, remote)
    assert data_format.read_split_info(remote, "index").num_examples > 0
    assert data_format.read_split_info(remote, "train").num_examples > 0


def test_revisited_to_tfrecord_into_ram_equals_a_local_build(ram, cwd, tmp_path):
    tiny_dir = tmp_path / "tiny"
    tiny_dir.mkdir()
    tiny = make_tiny_set(tiny_dir)
    local, remote = str(tmp_path / "local"), f"{ram}/data"
    for out in (local, remote):
        revisited_to_tfrecord.build_revisited(
            tiny["gnd"], tiny["images"], out, num_shards=2, num_workers=1
        )
    info = _assert_same_data_folder(
        local, remote, (revisited_to_tfrecord.DB_SPLIT, revisited_to_tfrecord.QUERY_SPLIT)
    )
    assert info["sources"]["revisited"]["gnd"] == os.path.abspath(tiny["gnd"])
    gnd = data_format.read_revisited_gnd(f"{remote}/{revisited_to_tfrecord.GND_FILE}")
    assert gnd["qimlist"] == tiny["data"]["qimlist"]
    # The query crops' scratch folder is gone.
    assert not [n for n in file_io.listdir(remote) if n.startswith(".revisited-crops-")]


def test_ram_output_with_worker_processes_is_refused(demo_raw, ram, cwd, tmp_path):
    out = f"{ram}/data"
    with pytest.raises(ValueError, match=f"{out}.*num_workers=1"):
        gldv2_to_tfrecord.build_split(
            "index", f"{demo_raw}/index.csv", f"{demo_raw}/index", out, 2, num_workers=2
        )
    # The default for a ram:// folder is one process.
    _build_index(demo_raw, f"{ram}/default", num_workers=None)
    assert data_format.read_split_info(f"{ram}/default", "index").num_examples > 0
    tiny_dir = tmp_path / "tiny"
    tiny_dir.mkdir()
    tiny = make_tiny_set(tiny_dir)
    with pytest.raises(ValueError, match=f"{out}.*num_workers=1"):
        revisited_to_tfrecord.build_revisited(tiny["gnd"], tiny["images"], out, num_workers=2)
    with pytest.raises(ValueError, match=f"{out}.*num_workers=1"):
        make_demo_dataset.make_demo_dataset(out, **{**TINY_DEMO, "num_workers": 2})
    # Refused before any work: nothing was written.
    assert not file_io.exists(out)
