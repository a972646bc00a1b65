"""build_dataset under faults: a failed rebuild, a killed build, two builds at
once, and a build folder whose features.json names a module outside TFDS.

Each test copies one tiny gldv2/clean build (built once per module, about a
second) with its raw tree, and checks the files a fault leaves against the
files before it, byte for byte.
"""

import json
import os
import shutil
import sys

import pytest

from data_pipelines import build_dataset, build_swap, gldv2_builder, image_encoding
from landmark_jax.data import data_format
from landmark_jax.runtime import entry_point_errors, file_lease

import tiny_gldv2

pytestmark = pytest.mark.e2e

DATASET = "gldv2/clean"
OPTIONS = dict(num_shards=1, num_workers=1)


def _files(folder) -> dict[str, bytes]:
    return {name: open(os.path.join(folder, name), "rb").read() for name in os.listdir(folder)}


@pytest.fixture(scope="module")
def original(tmp_path_factory):
    """(raw tree, data dir) of one tiny gldv2/clean build."""
    root = tmp_path_factory.mktemp("faults")
    tiny_gldv2.make_tiny_gldv2(
        str(root / "raw"), num_landmarks=2, images_per_landmark=3, num_index=2, num_test=2
    )
    build_dataset.build(DATASET, str(root / "tfds"), manual_dir=str(root / "raw"), **OPTIONS)
    return root / "raw", root / "tfds"


@pytest.fixture()
def copy(original, tmp_path):
    """(raw, data dir, build folder) of a copy of the original build."""
    raw, data_dir = tmp_path / "raw", tmp_path / "tfds"
    shutil.copytree(original[0], raw)
    shutil.copytree(original[1], data_dir)
    return str(raw), str(data_dir), str(data_dir / "gldv2" / "clean" / "1.0.0")


def _rebuild(raw: str, data_dir: str):
    return build_dataset.build(DATASET, data_dir, manual_dir=raw, overwrite=True, **OPTIONS)


def test_a_failed_rebuild_leaves_the_previous_build_as_it_was(copy):
    # --overwrite deleted the previous build before building (S4).
    raw, data_dir, final = copy
    before = _files(final)
    train_csv = open(os.path.join(raw, "train.csv")).read().splitlines()
    bad = tiny_gldv2.image_path(raw, "train", train_csv[1].split(",")[0])
    good_image = open(bad, "rb").read()
    open(bad, "wb").write(good_image[:200])  # a truncated JPEG
    with pytest.raises(image_encoding.BadImageError, match=bad):
        _rebuild(raw, data_dir)
    assert _files(final) == before
    # Nothing left beside it: the staged rebuild is gone, nothing set aside.
    assert os.listdir(os.path.dirname(final)) == ["1.0.0"]
    assert data_format.find_build(data_dir) == final

    # Fixed, the rebuild replaces it: another build id, the same examples.
    open(bad, "wb").write(good_image)
    builder, reused = _rebuild(raw, data_dir)
    assert not reused and os.fspath(builder.data_dir) == final
    assert os.listdir(os.path.dirname(final)) == ["1.0.0"]
    after = _files(final)
    assert sorted(after) == sorted(before)
    build_ids = [json.loads(f["metadata.json"])[data_format.BUILD_ID] for f in (before, after)]
    assert build_ids[0] != build_ids[1]
    assert all(after[n] == before[n] for n in after if ".tfrecord-" in n)


def test_a_killed_builds_temporary_folders_are_ignored_then_removed(copy, caplog):
    # They stayed forever, and one holding metadata made the data dir
    # ambiguous (S17).
    raw, data_dir, final = copy
    config_dir = os.path.dirname(final)
    # What a kill during TFDS's final metadata write leaves, and a staged
    # rebuild of build_dataset killed the same way.
    tfds_temporary = os.path.join(config_dir, "incomplete.MJNJVM_1.0.0")
    shutil.copytree(final, tfds_temporary)
    staged = os.path.join(config_dir, "incomplete.rebuild_0123abcd", "gldv2", "clean")
    shutil.copytree(final, os.path.join(staged, "incomplete.QWERTY_1.0.0"))
    for folder in (data_dir, os.path.dirname(config_dir), config_dir):
        assert data_format.find_build(folder) == final
    assert data_format.find_build(tfds_temporary) == tfds_temporary  # named, it is read
    before = _files(final)
    # Only the temporaries exist: not a build, and the message says why.
    moved = os.path.join(str(copy[1]) + "_moved")
    shutil.move(final, moved)
    with pytest.raises(data_format.DataFormatError, match=r"only unfinished builds.*MJNJVM"):
        data_format.find_build(data_dir)
    shutil.move(moved, final)

    # A rerun removes them, naming each: one that reuses the build...
    with caplog.at_level("WARNING"):
        _, reused = build_dataset.build(DATASET, data_dir, manual_dir=raw, **OPTIONS)
    assert reused and os.listdir(config_dir) == ["1.0.0"]
    assert f"{tfds_temporary}: deleting the temporary folder of a build that did not" in (
        caplog.text
    )
    assert "incomplete.rebuild_0123abcd: deleting" in caplog.text
    assert _files(final) == before
    # ... and one that builds.
    shutil.copytree(final, tfds_temporary)
    _rebuild(raw, data_dir)
    assert os.listdir(config_dir) == ["1.0.0"]
    assert sorted(_files(final)) == sorted(before)


def test_a_second_build_of_a_config_fails_in_one_line_and_touches_nothing(copy):
    # It failed with a TFDS FileExistsError traceback at the end (S18).
    raw, data_dir, final = copy
    config_dir = os.path.dirname(final)
    # A build of the same config running: its lease, its temporary folder.
    running = file_lease.Lease(build_swap.lease_path(final)).acquire()
    try:
        temporary = os.path.join(config_dir, "incomplete.ABCDEF_1.0.0")
        os.makedirs(temporary)
        open(os.path.join(temporary, "shard"), "w").write("being written")
        before = _files(final)
        with pytest.raises(file_lease.LeaseHeld) as error:
            _rebuild(raw, data_dir)
        message = str(error.value)
        assert message.startswith(f"another build of {DATASET} into {config_dir} is running (")
        assert f"pid {os.getpid()}," in message and "\n" not in message
        assert entry_point_errors.is_user_error(error.value)
        assert _files(final) == before
        assert _files(temporary) == {"shard": b"being written"}
    finally:
        running.release()


def test_a_build_that_loses_the_race_to_tfds_build_fails_in_one_line(copy, monkeypatch):
    # Another build that takes no lease (`tfds build`) finishing first.
    raw, data_dir, final = copy
    shutil.rmtree(final)
    record = gldv2_builder.Gldv2._record_metadata

    def finished_elsewhere(self):
        record(self)
        os.makedirs(final)
        open(os.path.join(final, "theirs"), "w").write("the other build")

    monkeypatch.setattr(gldv2_builder.Gldv2, "_record_metadata", finished_elsewhere)
    with pytest.raises(RuntimeError) as error:
        build_dataset.build(DATASET, data_dir, manual_dir=raw, **OPTIONS)
    assert str(error.value).startswith(
        f"{final}: another build finished there while this one ran (two builds into one "
        "data dir at once); that build is kept, this one discarded"
    )
    assert entry_point_errors.is_user_error(error.value)
    assert _files(final) == {"theirs": b"the other build"}
    assert os.listdir(os.path.dirname(final)) == ["1.0.0"]


def test_a_feature_class_outside_tfds_is_refused_before_tfds_imports_it(
    copy, tmp_path, monkeypatch
):
    # TFDS imported any installed module named in features.json (S11).
    _, _, final = copy
    probe = "tfds_import_probe"
    marker = tmp_path / "imported"
    (tmp_path / f"{probe}.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    features = os.path.join(final, "features.json")
    text = open(features).read()
    nested = "tensorflow_datasets.core.features.text_feature.Text"  # the `id` feature's
    assert text.count(nested) == 1
    open(features, "w").write(text.replace(nested, f"{probe}.Text"))
    with pytest.raises(data_format.DataFormatError) as error:
        data_format.read_num_classes(final)
    assert str(error.value).startswith(
        f"{features}: pythonClassName '{probe}.Text' is not a TensorFlow Datasets feature class"
    )
    assert not marker.exists() and probe not in sys.modules
    # The folder above it, as a config's data_dir may name it, too.
    with pytest.raises(data_format.DataFormatError, match=f"'{probe}.Text'"):
        data_format.open_build(os.path.dirname(os.path.dirname(final)))
    assert not marker.exists()
