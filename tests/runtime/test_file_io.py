"""file_io on local paths and on TensorFlow's in-memory ram:// (a URL filesystem
through tf.io.gfile, as gs:// is), against what Python and numpy say."""

import os
import uuid

import numpy as np
import pytest

from landmark_jax.runtime import file_io


@pytest.fixture(params=["local", "ram"])
def root(request, tmp_path):
    if request.param == "local":
        return str(tmp_path)
    return f"ram://file-io-test-{uuid.uuid4().hex}"


def test_write_read_list_and_replace(root):
    path = file_io.join(root, "a", "b.json")
    file_io.write_json(path, {"x": [1, 2]})
    assert file_io.read_json(path) == {"x": [1, 2]}
    assert file_io.isfile(path) and not file_io.isdir(path)
    assert file_io.isdir(file_io.join(root, "a")) and not file_io.isfile(file_io.join(root, "a"))
    # A shorter rewrite replaces the file (TF's ram:// would append).
    file_io.write_text(path, "{}")
    assert file_io.read_text(path) == "{}"
    # A sibling sharing the folder's name as a prefix is not in the folder.
    file_io.write_text(file_io.join(root, "a.csv"), "id\n")
    file_io.write_bytes(file_io.join(root, "a", "c.bin"), b"\x00\xff")
    assert file_io.listdir(file_io.join(root, "a")) == ["b.json", "c.bin"]
    assert file_io.listdir(file_io.join(root, "missing")) == []
    assert [file_io.basename(p) for p in file_io.glob(file_io.join(root, "a", "*.bin"))] == [
        "c.bin"
    ]
    assert file_io.read_bytes(file_io.join(root, "a", "c.bin")) == b"\x00\xff"
    file_io.rename(file_io.join(root, "a", "c.bin"), file_io.join(root, "a", "d.bin"))
    assert file_io.listdir(file_io.join(root, "a")) == ["b.json", "d.bin"]
    file_io.rmtree(file_io.join(root, "a"))
    assert not file_io.exists(file_io.join(root, "a", "b.json"))
    assert file_io.listdir(root) == ["a.csv"]


def test_npz_round_trip_and_utf8_with_byte_order_mark(root):
    path = file_io.join(root, "e.npz")
    ids = np.array(["q1", "longer-id"])
    emb = np.arange(6, dtype=np.float32).reshape(2, 3)
    file_io.save_npz(path, ids=ids, embeddings=emb)
    loaded = file_io.load_npz(path)
    np.testing.assert_array_equal(loaded["ids"], ids)
    np.testing.assert_array_equal(loaded["embeddings"], emb)
    csv_path = file_io.join(root, "s.csv")
    file_io.write_bytes(csv_path, "\ufeffid,é\n".encode())
    assert file_io.read_text(csv_path) == "id,é\n"


def test_errors_name_the_path(root, tmp_path):
    missing = file_io.join(root, "nope.json")
    with pytest.raises(FileNotFoundError, match="nope.json"):
        file_io.read_json(missing)
    bad = file_io.join(root, "bad.json")
    file_io.write_text(bad, "{not json")
    with pytest.raises(ValueError, match="bad.json: not valid JSON"):
        file_io.read_json(bad)
    with pytest.raises(ValueError, match="cannot append"), file_io.open_file(bad, "a"):
        pass
    # The caller's own errors inside the with pass through unchanged.
    with pytest.raises(KeyError, match="mine"), file_io.open_file(bad) as f:
        f.read()
        raise KeyError("mine")


def test_a_local_path_that_cannot_be_written_is_named(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    target = str(blocker / "sub" / "out.json")
    with pytest.raises(OSError, match="file/sub"):
        file_io.write_json(target, {})
    assert sorted(os.listdir(tmp_path)) == ["file"]


def test_checkpoint_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert file_io.checkpoint_path("run") == str(tmp_path / "run")
    assert file_io.checkpoint_path("gs://b/run/") == "gs://b/run"
    with pytest.raises(ValueError, match="ram://x/run: Orbax checkpoints go to"):
        file_io.checkpoint_path("ram://x/run")
    assert file_io.absolute("gs://b/x") == "gs://b/x"
    assert file_io.join("gs://b", "x", "y") == "gs://b/x/y"
    assert file_io.dirname("gs://b/x/y") == "gs://b/x" and file_io.basename("gs://b/x/") == "x"
