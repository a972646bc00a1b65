"""The GLDv2 TFDS builder and its command line, on tiny generated GLDv2 trees.

What the builds hold is checked against references of their own: the CSVs
(read here with the csv module), the image files, and the shard files parsed
with protobuf from the file names and lengths in dataset_info.json (read as
JSON), not through TFDS or the project's readers. Builds are shared by the
tests of a module (each one costs a fraction of a second once TensorFlow is
warm, the first about five seconds).
"""

import collections
import csv
import glob
import io
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image

from data_pipelines import (
    build_dataset,
    describe_dataset,
    gldv2_builder,
    gldv2_csv,
    image_encoding,
    landmark_examples,
)
from landmark_jax.data import data_format
from landmark_jax.runtime import entry_point_errors

import tiny_gldv2

VAL_FRACTION = 0.3
NUM_NONLANDMARK = 3


# ------------------------------------------------------------------ readers


def read_records(build: str, split: str) -> list[dict]:
    """Every example of a split, parsed with protobuf from its shard files."""
    info = json.load(open(os.path.join(build, "dataset_info.json")))
    entry = next(s for s in info["splits"] if s["name"] == split)
    lengths = [int(n) for n in entry["shardLengths"]]
    files = sorted(glob.glob(os.path.join(build, f"*-{split}.tfrecord-*")))
    assert len(files) == len(lengths), (files, lengths)
    rows = []
    for path, length in zip(files, lengths, strict=True):
        n = 0
        for raw in tf.data.TFRecordDataset(path).as_numpy_iterator():
            feats = tf.train.Example.FromString(raw).features.feature
            row = {k: (v.bytes_list.value or v.int64_list.value)[0] for k, v in feats.items()}
            row["id"] = row["id"].decode()
            rows.append(row)
            n += 1
        assert n == length, path
    return rows


def split_names(build: str) -> set[str]:
    info = json.load(open(os.path.join(build, "dataset_info.json")))
    return {s["name"] for s in info["splits"]}


def metadata(build: str) -> dict:
    return json.load(open(os.path.join(build, "metadata.json")))


def read_csv(path: str) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def csv_train(root: str) -> dict[str, int]:
    """train.csv: id -> landmark_id."""
    return {r["id"]: int(r["landmark_id"]) for r in read_csv(f"{root}/train.csv")}


def csv_clean(root: str) -> dict[str, int]:
    """train_clean.csv: id -> landmark_id."""
    return {
        i: int(r["landmark_id"])
        for r in read_csv(f"{root}/train_clean.csv")
        for i in r["images"].split()
    }


def build(dataset: str, data_dir: str, manual_dir: str, **kwargs) -> str:
    """Builds through the command line's function; returns the build folder."""
    kwargs = {"num_workers": 1, **kwargs}
    builder, _ = build_dataset.build(dataset, data_dir, manual_dir=manual_dir, **kwargs)
    return os.fspath(builder.data_dir)


# ----------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """(root, ids, the landmark with no clean image) of a tiny GLDv2 tree.

    The grayscale, PNG and CMYK images are there; the first landmark's row
    is removed from train_clean.csv, so its images are all noisy and the
    three configs select three different sets; nonlandmark.csv and its
    images are added.
    """
    root = str(tmp_path_factory.mktemp("gldv2_raw"))
    ids = tiny_gldv2.make_tiny_gldv2(root, special=True)
    lines = open(f"{root}/train_clean.csv").read().splitlines()
    dropped = int(lines[1].split(",")[0])
    open(f"{root}/train_clean.csv", "w").write("\n".join([lines[0], *lines[2:]]) + "\n")
    ids["clean"] = {i for i in ids["clean"] if ids["train"][i] != dropped}
    nonlandmark = [f"{n:016x}" for n in range(0xABC000, 0xABC000 + NUM_NONLANDMARK)]
    for i, source in zip(nonlandmark, ids["test"], strict=False):
        path = tiny_gldv2.image_path(root, "nonlandmark", i)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        shutil.copy(tiny_gldv2.image_path(root, "test", source), path)
    open(f"{root}/nonlandmark.csv", "w").write("id\n" + "\n".join(nonlandmark) + "\n")
    ids["nonlandmark"] = nonlandmark
    return root, ids, dropped


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture(scope="module")
def full(tree, data_dir):
    """gldv2/full with a larger val split, in 2 shards per split."""
    root, _, _ = tree
    return build("gldv2/full", data_dir, root, num_shards=2, val_fraction=VAL_FRACTION)


@pytest.fixture(scope="module")
def named(tree, data_dir):
    """The clean and gldv2x configs as they are named, in 1 shard per split."""
    root, _, _ = tree
    return {c: build(f"gldv2/{c}", data_dir, root, num_shards=1) for c in ("clean", "gldv2x")}


@pytest.fixture(scope="module")
def bad_tree(tmp_path_factory):
    """A tiny tree with a missing and a truncated train image."""
    root = str(tmp_path_factory.mktemp("gldv2_bad"))
    return root, tiny_gldv2.make_tiny_gldv2(root, missing=True, corrupt=True)


# -------------------------------------------------------------- the images


@pytest.mark.e2e
def test_rgb_jpegs_are_stored_byte_for_byte_and_others_as_rgb_jpegs(full, tree):
    root, ids, _ = tree
    assert full.endswith(os.path.join("gldv2", f"full_val{VAL_FRACTION:g}", "1.0.0"))
    by_split = {s: read_records(full, s) for s in ("train", "val", "index", "test")}
    by_id = {r["id"]: r for r in by_split["train"] + by_split["val"]}
    for kind, image_id in ids["special"].items():
        image = Image.open(io.BytesIO(by_id[image_id]["image"]))
        assert (image.format, image.mode) == ("JPEG", "RGB"), kind
        ext = ".png" if kind == "png" else ".jpg"
        source = Image.open(tiny_gldv2.image_path(root, "train", image_id, ext)).convert("RGB")
        diff = np.abs(np.asarray(image, float) - np.asarray(source, float))
        assert diff.mean() < 4.0, (kind, diff.mean())
    # Every ordinary RGB JPEG, in every split, is the file itself: no second
    # lossy encoding.
    special = set(ids["special"].values())
    for split, rows in by_split.items():
        folder = "train" if split == "val" else split
        for r in rows:
            if r["id"] not in special:
                with open(tiny_gldv2.image_path(root, folder, r["id"]), "rb") as f:
                    assert r["image"] == f.read(), (split, r["id"])


def test_16_bit_grayscale_is_scaled_not_clipped_white(tmp_path):
    # A 16-bit gradient: PIL's own convert('RGB') would clip it to 255.
    values = np.linspace(0, 65535, 32 * 48).reshape(32, 48).astype(np.uint16)
    path = str(tmp_path / "deep.png")
    Image.fromarray(values).save(path)  # mode I;16
    assert Image.open(path).mode.startswith("I")
    decoded = np.asarray(Image.open(io.BytesIO(image_encoding.encode_image(path))), float)
    assert decoded.shape == (32, 48, 3)
    np.testing.assert_allclose(decoded[..., 0], values / 257.0, atol=4.0)
    # A float image has no known 8-bit scale: refused by name.
    floats = str(tmp_path / "float.tif")
    Image.fromarray(np.full((8, 8), 1234.5, np.float32)).save(floats)  # mode F
    with pytest.raises(image_encoding.BadImageError, match=rf"{floats}: a 'F' image"):
        image_encoding.encode_image(floats)


# ------------------------------------------------------ labels and splits


@pytest.mark.e2e
def test_labels_follow_the_csvs_in_landmark_id_order(full, tree):
    root, _, _ = tree
    train_csv, clean_csv = csv_train(root), csv_clean(root)
    train, val = read_records(full, "train"), read_records(full, "val")
    # Every row of train.csv once, in train or val.
    assert sorted(r["id"] for r in train + val) == sorted(train_csv)
    landmarks = sorted(set(train_csv.values()))
    for r in train + val:
        landmark = train_csv[r["id"]]
        assert r["landmark_id"] == landmark
        assert r["label"] == landmarks.index(landmark)
        assert r["is_clean"] == int(r["id"] in clean_csv)
    # The ClassLabel's names are the landmark ids in label order.
    names = open(os.path.join(full, "label.labels.txt")).read().split()
    assert names == [str(lm) for lm in landmarks]
    # The id-only splits: every id of their CSV, unlabelled.
    for split in ("index", "test", "nonlandmark"):
        rows = read_records(full, split)
        expected = [r["id"] for r in read_csv(f"{root}/{split}.csv")]
        assert sorted(r["id"] for r in rows) == sorted(expected), split
        assert {(r["label"], r["landmark_id"], r["is_clean"]) for r in rows} == {(-1, -1, 0)}


@pytest.mark.e2e
def test_val_takes_clean_images_per_class_never_the_last(full, tree):
    root, _, dropped = tree
    train_csv, clean_csv = csv_train(root), csv_clean(root)
    train, val = read_records(full, "train"), read_records(full, "val")
    assert val and all(r["id"] in clean_csv for r in val)
    clean_of = collections.Counter(clean_csv.values())
    val_of = collections.Counter(train_csv[r["id"]] for r in val)
    train_clean_of = collections.Counter(train_csv[r["id"]] for r in train if r["is_clean"])
    # A class without clean images gives none; the others floor(f n + u) of
    # their n clean images (u in [0, 1)), keeping at least one for training.
    assert dropped not in val_of and dropped not in clean_of
    for landmark, n in clean_of.items():
        low = int(np.floor(VAL_FRACTION * n))
        assert low <= val_of[landmark] <= min(low + 1, n - 1), landmark
        assert train_clean_of[landmark] == n - val_of[landmark] >= 1


@pytest.mark.e2e
def test_same_seed_same_shards_with_one_or_two_workers(full, tree, tmp_path):
    root, _, _ = tree
    again = build(
        "gldv2/full", str(tmp_path / "a"), root, num_shards=2, val_fraction=VAL_FRACTION,
        num_workers=2,
    )  # fmt: skip
    shards = sorted(os.path.basename(p) for p in glob.glob(os.path.join(full, "*.tfrecord-*")))
    assert len(shards) == 2 * 5
    for name in shards:
        with open(os.path.join(full, name), "rb") as a, open(os.path.join(again, name), "rb") as b:
            assert a.read() == b.read(), name
    other = build(
        "gldv2/full", str(tmp_path / "b"), root, num_shards=2, val_fraction=VAL_FRACTION, seed=1
    )
    assert other.endswith(f"full_val{VAL_FRACTION:g}_seed1/1.0.0")
    assert {r["id"] for r in read_records(full, "val")} != {
        r["id"] for r in read_records(other, "val")
    }


def test_assign_val_never_takes_a_class_last_clean_image():
    # Classes of 1 and 2 clean images, and a noisy image each.
    examples = [
        landmark_examples.Example(f"{label}-{j}", "", label, label, int(j < 1 + label % 2))
        for label in range(400)
        for j in range(3 if label % 2 else 2)
    ]
    for seed in range(3):
        is_val = landmark_examples.assign_val(examples, 0.99, np.random.default_rng(seed))
        kept = collections.Counter(
            e.label for e, v in zip(examples, is_val, strict=True) if e.is_clean and not v
        )
        assert len(kept) == 400 and min(kept.values()) >= 1
        assert not any(v and not e.is_clean for e, v in zip(examples, is_val, strict=True))
    # The expected fraction holds for small classes: 2 clean images at f=0.25
    # give floor(0.5 + u) = 1 with probability 1/2 (200 such classes here).
    is_val = landmark_examples.assign_val(examples, 0.25, np.random.default_rng(0))
    twos = sum(v for e, v in zip(examples, is_val, strict=True) if e.label % 2)
    assert 80 < twos < 120
    again = landmark_examples.assign_val(examples, 0.25, np.random.default_rng(0))
    np.testing.assert_array_equal(is_val, again)


@pytest.mark.e2e
def test_configs_select_their_rows(full, named, tree):
    root, _, dropped = tree
    train_csv, clean_csv = csv_train(root), csv_clean(root)
    clean_classes = set(clean_csv.values())
    expected = {
        "full": (full, set(train_csv)),
        "clean": (named["clean"], set(clean_csv)),
        "gldv2x": (named["gldv2x"], {i for i, lm in train_csv.items() if lm in clean_classes}),
    }
    assert len(expected["clean"][1]) < len(expected["gldv2x"][1]) < len(train_csv)
    for config, (path, ids) in expected.items():
        written = [
            r["id"]
            for s in ("train", "val")
            if s in split_names(path)
            for r in read_records(path, s)
        ]
        assert sorted(written) == sorted(ids), config
        names = open(os.path.join(path, "label.labels.txt")).read().split()
        landmarks = sorted({train_csv[i] for i in ids})
        assert names == [str(lm) for lm in landmarks], config
        assert (str(dropped) in names) == (config == "full")
    # index and test with full and gldv2x, not clean; nonlandmark whenever
    # its CSV is there.
    assert split_names(full) - {"val"} == {"train", "index", "test", "nonlandmark"}
    assert split_names(named["gldv2x"]) - {"val"} == {"train", "index", "test", "nonlandmark"}
    assert split_names(named["clean"]) - {"val"} == {"train", "nonlandmark"}


@pytest.mark.e2e
def test_a_header_only_nonlandmark_csv_builds_no_such_split(tree, tmp_path):
    """make_demo_dataset --num_non_landmark_references=0 writes nonlandmark.csv
    with its header alone: no split, rather than an empty-CSV error."""
    root, _, _ = tree
    raw = tmp_path / "raw"
    raw.mkdir()
    for name in ("train.csv", "train_clean.csv", "train"):
        os.symlink(os.path.join(root, name), raw / name)
    (raw / "nonlandmark.csv").write_text("id\n")
    path = build("gldv2/clean", str(tmp_path / "tfds"), str(raw))
    assert split_names(path) - {"val"} == {"train"}


@pytest.mark.e2e
def test_class_counts_are_the_counts_of_the_records(full, named, tree):
    root, _, _ = tree
    train_csv = csv_train(root)
    for path in (full, *named.values()):
        counts = metadata(path)[data_format.CLASS_COUNTS]
        train = read_records(path, "train")
        both = train + (read_records(path, "val") if "val" in split_names(path) else [])
        num_classes = len(open(os.path.join(path, "label.labels.txt")).read().split())

        def per_label(rows, clean_only=False, n=num_classes):
            labels = [r["label"] for r in rows if r["is_clean"] or not clean_only]
            return np.bincount(labels, minlength=n).tolist()

        assert counts == {
            "count": per_label(train),
            "num_clean": per_label(train, True),
            "train_val_count": per_label(both),
            "train_val_clean": per_label(both, True),
        }, path
        # Nothing was skipped: train + val per class is the CSV's rows.
        landmarks = [int(n) for n in open(os.path.join(path, "label.labels.txt")).read().split()]
        in_build = collections.Counter(train_csv[r["id"]] for r in both)
        assert counts["train_val_count"] == [in_build[lm] for lm in landmarks]
        # And the project's reader agrees.
        label_map = data_format.read_label_map(path)
        np.testing.assert_array_equal(label_map.landmark_ids, landmarks)
        np.testing.assert_array_equal(label_map.train_val_counts, counts["train_val_count"])
    source = metadata(full)["source"]
    assert source == {
        "manual_dir": os.path.abspath(root),
        "train_images": "all",
        "val_fraction": VAL_FRACTION,
        "seed": 0,
        "jpeg_quality": 95,
    }
    assert metadata(full)[data_format.SKIPPED_IMAGES] == []


@pytest.mark.e2e
def test_label_map_refuses_class_counts_that_disagree_with_the_build(full, tmp_path):
    def damaged(change) -> str:
        copy = str(tmp_path / f"copy{len(os.listdir(tmp_path))}")
        shutil.copytree(full, copy)
        meta = metadata(copy)
        change(meta[data_format.CLASS_COUNTS])
        open(os.path.join(copy, "metadata.json"), "w").write(json.dumps(meta))
        return copy

    def more(counts):
        counts["train_val_count"][0] += 1

    def below(counts):
        counts["train_val_count"][0] = counts["count"][0] - 1

    cases = {
        "has no entries for 6 classes": lambda c: c.pop("train_val_clean"),
        "train_val_count has 5 entries for 6 classes": lambda c: c["train_val_count"].pop(),
        r"the counts sum to \d+ \(train\) and \d+ \(train \+ val\) but the splits hold": more,
        "label 0 has train_val_count .* < count": below,
    }
    for message, change in cases.items():
        with pytest.raises(data_format.DataFormatError, match=message):
            data_format.read_label_map(damaged(change))


# ------------------------------------------------------------- bad input


@pytest.mark.e2e
def test_missing_image_names_the_csv_and_expected_path(bad_tree, tmp_path):
    root, ids = bad_tree
    expected = tiny_gldv2.image_path(root, "train", ids["missing"])
    with pytest.raises(FileNotFoundError) as error:
        build("gldv2/full", str(tmp_path), root)
    assert f"{root}/train.csv" in str(error.value) and expected in str(error.value)
    assert "--skip_bad_images" in str(error.value)


@pytest.mark.e2e
@pytest.mark.parametrize("num_workers", [1, 2])
def test_undecodable_image_names_its_path_and_leaves_no_build(num_workers, tmp_path):
    root = str(tmp_path / "raw")
    ids = tiny_gldv2.make_tiny_gldv2(root, corrupt=True)
    path = tiny_gldv2.image_path(root, "train", ids["corrupt"])
    data_dir = tmp_path / "tfds"
    with pytest.raises(image_encoding.BadImageError, match=path) as error:
        build("gldv2/clean", str(data_dir), root, num_workers=num_workers)
    # Raised from the builder, also when a worker process found it: the
    # command line prints it as a message, not as a bug's traceback.
    assert entry_point_errors.is_user_error(error.value)
    assert os.listdir(data_dir / "gldv2" / "clean") == []


@pytest.mark.e2e
def test_skip_bad_images_lists_them_and_leaves_them_out(bad_tree, tmp_path):
    root, ids = bad_tree
    path = build("gldv2/full", str(tmp_path), root, skip_bad_images=True, val_fraction=0.2)
    missing = tiny_gldv2.image_path(root, "train", ids["missing"])
    corrupt = tiny_gldv2.image_path(root, "train", ids["corrupt"])
    skipped = metadata(path)[data_format.SKIPPED_IMAGES]
    assert sorted(s[:2] for s in skipped) == sorted(
        [[ids["missing"], missing], [ids["corrupt"], corrupt]]
    )
    assert dict((s[0], s[2]) for s in skipped)[ids["missing"]] == "missing file"
    assert "Truncated" in dict((s[0], s[2]) for s in skipped)[ids["corrupt"]]
    written = [r["id"] for s in ("train", "val") for r in read_records(path, s)]
    assert sorted(written) == sorted(set(ids["train"]) - {ids["missing"], ids["corrupt"]})
    # The class counts are of the images written.
    assert sum(metadata(path)[data_format.CLASS_COUNTS]["train_val_count"]) == len(written)
    summary = describe_dataset.summarize(path)
    assert "skipped images: 2 (all in metadata.json 'skipped_images'): " in summary
    assert ids["missing"] in summary and corrupt in summary


def _rewrite(path, header, rows):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


@pytest.mark.e2e
def test_csv_errors_name_file_and_value(tree, tmp_path):
    root, ids, _ = tree
    first = next(iter(ids["train"]))
    raw = tmp_path / "raw"
    raw.mkdir()
    os.symlink(f"{root}/train", raw / "train")
    train_csv = str(raw / "train.csv")

    # A repeated id stops the build, naming both lines.
    shutil.copy(f"{root}/train_clean.csv", raw / "train_clean.csv")
    _rewrite(train_csv, ["id", "url", "landmark_id"], [[first, "", 1], [first, "", 2]])
    with pytest.raises(
        gldv2_csv.GLDv2FormatError, match=rf"{train_csv}: 1 duplicate.*{first} \(lines 2 and 3\)"
    ):
        build("gldv2/full", str(tmp_path / "tfds"), str(raw))

    _rewrite(train_csv, ["id", "url"], [[first, ""]])
    with pytest.raises(
        gldv2_csv.GLDv2FormatError, match=r"train\.csv.*missing column.*landmark_id"
    ):
        gldv2_csv.read_train_csv(train_csv)
    _rewrite(train_csv, ["id", "url", "landmark_id"], [[first, "", "abc"]])
    with pytest.raises(gldv2_csv.GLDv2FormatError, match=r"train\.csv:2: landmark_id 'abc'"):
        gldv2_csv.read_train_csv(train_csv)
    # A Latin-1 byte on line 3: the file, line and offset are named.
    with open(train_csv, "wb") as f:
        f.write(f"id,url,landmark_id\n{first},,1\nx\xe9,,2\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"train\.csv:3: byte 0xe9 at offset \d+ is not UTF-8"):
        gldv2_csv.read_train_csv(train_csv)

    # train_clean.csv naming an id that train.csv lacks.
    shutil.copy(f"{root}/train.csv", train_csv)
    _rewrite(str(raw / "train_clean.csv"), ["landmark_id", "images"], [[100, "ffffffffffffffff"]])
    with pytest.raises(gldv2_csv.GLDv2FormatError, match="ffffffffffffffff"):
        build("gldv2/clean", str(tmp_path / "tfds"), str(raw))
    # A config that needs a CSV the manual dir lacks.
    os.remove(raw / "train_clean.csv")
    with pytest.raises(FileNotFoundError, match=r"train_clean\.csv not found"):
        build("gldv2/gldv2x", str(tmp_path / "tfds"), str(raw))


def _raw_copy(root: str, raw, copied: tuple[str, ...] = ()) -> None:
    """A manual dir at `raw` with root's CSVs copied (editable) and its image
    trees linked, but for the trees named in `copied`, which are copied."""
    os.makedirs(raw)
    for name in ("train.csv", "train_clean.csv", "index.csv", "test.csv"):
        shutil.copy(f"{root}/{name}", f"{raw}/{name}")
    for split in ("train", "index", "test"):
        if split in copied:
            shutil.copytree(f"{root}/{split}", f"{raw}/{split}")
        else:
            os.symlink(f"{root}/{split}", f"{raw}/{split}")


@pytest.mark.e2e
@pytest.mark.parametrize("config", ["full", "gldv2x"])
def test_a_build_without_train_clean_csv_is_refused(config, tree, tmp_path):
    # Without it every image of `full` was marked clean (S7).
    root, _, _ = tree
    raw = tmp_path / "raw"
    _raw_copy(root, raw)
    os.remove(raw / "train_clean.csv")
    with pytest.raises(FileNotFoundError, match=rf"^{raw}/train_clean\.csv not found") as error:
        build(f"gldv2/{config}", str(tmp_path / "tfds"), str(raw))
    assert entry_point_errors.is_user_error(error.value)
    assert not glob.glob(str(tmp_path / "tfds" / "gldv2" / config / "*"))


@pytest.mark.e2e
def test_a_landmark_id_beyond_int64_names_file_and_line(tree, tmp_path):
    # TFDS failed on it after encoding, with 61 lines of image bytes (S19).
    root, ids, _ = tree
    raw = tmp_path / "raw"
    _raw_copy(root, raw)
    rows = read_csv(f"{raw}/train.csv")
    rows[3]["landmark_id"] = str(2**63)  # int64's largest value is 2**63 - 1
    _rewrite(f"{raw}/train.csv", ["id", "url", "landmark_id"], [r.values() for r in rows])
    with pytest.raises(
        gldv2_csv.GLDv2FormatError,
        match=rf"^{raw}/train\.csv:5: landmark_id 9223372036854775808 is out of range",
    ) as error:
        build("gldv2/full", str(tmp_path / "tfds"), str(raw))
    assert entry_point_errors.is_user_error(error.value)
    assert len(str(error.value).splitlines()) == 1
    # The extremes of int64 are ids like any other; the CSV's negative end too.
    rows[3]["landmark_id"] = str(2**63 - 1)
    _rewrite(f"{raw}/train.csv", ["id", "url", "landmark_id"], [r.values() for r in rows])
    assert gldv2_csv.read_train_csv(f"{raw}/train.csv")[3].landmark_id == 2**63 - 1
    _rewrite(f"{raw}/train_clean.csv", ["landmark_id", "images"], [[-(2**63) - 1, ids["index"][0]]])
    with pytest.raises(gldv2_csv.GLDv2FormatError, match=r"train_clean\.csv:2: .*out of range"):
        gldv2_csv.read_train_clean_csv(f"{raw}/train_clean.csv")


@pytest.mark.e2e
def test_an_image_in_two_splits_names_both_files_and_lines(tree, tmp_path):
    # Such a test image was built twice, silently (S20).
    root, ids, _ = tree
    raw = tmp_path / "raw"
    _raw_copy(root, raw, copied=("test",))
    train_id, index_id = list(ids["train"])[6], ids["index"][3]
    for split, image_id in (("train", train_id), ("index", index_id)):
        target = tiny_gldv2.image_path(str(raw), "test", image_id)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.copy(tiny_gldv2.image_path(root, split, image_id), target)
    test_csv = f"{raw}/test.csv"
    test_ids = [r["id"] for r in read_csv(test_csv)]  # lines 2..8
    # An index image also in test.csv, on line 9.
    _rewrite(test_csv, ["id"], [[i] for i in [*test_ids, index_id]])
    with pytest.raises(gldv2_csv.GLDv2FormatError) as error:
        build("gldv2/full", str(tmp_path / "tfds"), str(raw))
    assert str(error.value).startswith(
        f"1 image id(s) listed in two splits, e.g. {index_id} at {raw}/index.csv:5 and "
        f"{test_csv}:9: an image belongs to one split"
    )
    assert entry_point_errors.is_user_error(error.value)
    # A train image in test.csv, on line 2: two shared ids now.
    _rewrite(test_csv, ["id"], [[i] for i in [train_id, *test_ids, index_id]])
    with pytest.raises(
        gldv2_csv.GLDv2FormatError,
        match=rf"^2 image id\(s\) .* e\.g\. {train_id} at {raw}/train\.csv:8 and {test_csv}:2;",
    ):
        build("gldv2/full", str(tmp_path / "tfds"), str(raw))
    assert not glob.glob(str(tmp_path / "tfds" / "gldv2" / "full" / "*"))
    # The advice followed: each removed from test.csv, and the build goes on.
    _rewrite(test_csv, ["id"], [[i] for i in test_ids])
    build("gldv2/full", str(tmp_path / "tfds"), str(raw))
    assert glob.glob(str(tmp_path / "tfds" / "gldv2" / "full" / "*" / "dataset_info.json"))


@pytest.mark.e2e
def test_more_shards_than_examples_is_refused_before_encoding(tree, tmp_path):
    root, ids, _ = tree
    with pytest.raises(ValueError, match=r"num_shards=4: .*split 'nonlandmark' has 3") as error:
        build("gldv2/full", str(tmp_path), root, num_shards=4, val_fraction=VAL_FRACTION)
    assert "'train'" not in str(error.value)
    assert os.listdir(tmp_path / "gldv2" / f"full_val{VAL_FRACTION:g}") == []


@pytest.mark.e2e
def test_beam_options_need_apache_beam(tree, tmp_path):
    try:
        import apache_beam  # noqa: F401
    except ImportError:
        with pytest.raises(RuntimeError, match="pip install apache-beam"):
            build_dataset.beam_options("runner=DirectRunner")
    else:
        options = build_dataset.beam_options("runner=DirectRunner,direct_num_workers=2")
        assert options.get_all_options()["direct_num_workers"] == 2
    # skip_bad_images cannot run on Beam: refused before anything is read.
    builder = build_dataset.make_builder("gldv2/clean", str(tmp_path), skip_bad_images=True)
    with pytest.raises(ValueError, match="skip_bad_images is not available with Beam"):
        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(manual_dir=tree[0], beam_options=object())
        )


# ------------------------------------------------- the command line's parts


def test_dataset_names_configs_and_overrides(tmp_path):
    names = build_dataset.dataset_names()
    assert {"gldv2/full", "gldv2/clean", "gldv2/gldv2x", "landmark_demo"} <= set(names)
    with pytest.raises(ValueError, match=r"unknown data set; expected one of \[.*'gldv2/clean'"):
        build_dataset.make_builder("mnist", str(tmp_path))
    with pytest.raises(ValueError, match=r"gldv2 has no config 'cleen'; .*'gldv2/gldv2x'"):
        build_dataset.make_builder("gldv2/cleen", str(tmp_path))
    builder = build_dataset.make_builder("gldv2/clean", str(tmp_path), val_fraction=0.05, seed=1)
    config = builder.builder_config
    assert (config.name, config.val_fraction, config.seed) == ("clean_val0.05_seed1", 0.05, 1)
    assert (config.train_images, config.retrieval_splits) == ("clean", False)
    # Only what changes is named; nothing changed, the named config itself.
    assert build_dataset.make_builder("gldv2/full", str(tmp_path), seed=2).builder_config.name == (
        "full_seed2"
    )
    same = build_dataset.make_builder("gldv2/clean", str(tmp_path), val_fraction=0.02, seed=0)
    assert same.builder_config is gldv2_builder.Gldv2.builder_configs["clean"]
    assert build_dataset.make_builder(
        "landmark_demo", str(tmp_path), seed=3
    ).builder_config.name == ("default_seed3")
    with pytest.raises(ValueError, match=r"--val_fraction=1.5: must be in \[0, 1\]"):
        build_dataset.make_builder("gldv2/clean", str(tmp_path), val_fraction=1.5)
    # A builder without a validation split, or without the option.
    revisited = "revisited_oxford_paris/roxford5k"
    with pytest.raises(ValueError, match="config 'roxford5k' has no seed"):
        build_dataset.make_builder(revisited, str(tmp_path), seed=1)
    with pytest.raises(ValueError, match="--skip_bad_images: revisited_oxford_paris has no such"):
        build_dataset.make_builder(revisited, str(tmp_path), skip_bad_images=True)


@pytest.mark.e2e
def test_an_existing_build_is_reused_unless_overwrite(tree, tmp_path):
    root, _, _ = tree
    kwargs = dict(manual_dir=root, num_shards=1, num_workers=1)
    first, reused = build_dataset.build("gldv2/clean", str(tmp_path), **kwargs)
    build_id = metadata(first.data_dir)[data_format.BUILD_ID]
    assert not reused
    again, reused = build_dataset.build("gldv2/clean", str(tmp_path), **kwargs)
    assert reused and metadata(again.data_dir)[data_format.BUILD_ID] == build_id
    rebuilt, reused = build_dataset.build("gldv2/clean", str(tmp_path), overwrite=True, **kwargs)
    assert not reused and rebuilt.data_dir == first.data_dir
    assert metadata(rebuilt.data_dir)[data_format.BUILD_ID] != build_id
    assert data_format.read_label_map(str(rebuilt.data_dir)).num_classes == 5


@pytest.mark.e2e
def test_find_build_refuses_other_folders_and_several_builds(full, named, data_dir, tmp_path):
    (tmp_path / "notes.txt").write_text("not a build")
    with pytest.raises(data_format.DataFormatError, match="not a TensorFlow Datasets build"):
        data_format.find_build(str(tmp_path))
    with pytest.raises(data_format.DataFormatError, match=r"holds \d+ TFDS builds") as error:
        data_format.find_build(data_dir)
    assert full in str(error.value) and named["clean"] in str(error.value)
    # A folder above exactly one build names it.
    assert data_format.find_build(os.path.dirname(full)) == full


@pytest.mark.e2e
def test_command_line_end_to_end(tree, tmp_path):
    root, _, _ = tree
    out = str(tmp_path / "tfds")
    cmd = [
        sys.executable,
        "-m",
        "data_pipelines.build_dataset",
        "--dataset=gldv2/clean",
        f"--manual_dir={root}",
        f"--data_dir={out}",
        "--val_fraction=0.3",
        "--seed=1",
        "--num_shards=2",
        "--num_workers=1",
        "--skip_bad_images",
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    path = os.path.join(out, "gldv2", "clean_val0.3_seed1", "1.0.0")
    train, val = read_records(path, "train"), read_records(path, "val")
    assert sorted(r["id"] for r in train + val) == sorted(csv_clean(root))
    # The summary ends the output (TFDS prints its progress before it).
    lines = result.stdout.splitlines()
    lines = lines[lines.index(f"build: {path} (gldv2/clean_val0.3_seed1/1.0.0)") :]
    assert (
        f"  train      : {len(train):>11,d} examples in 2 shard files, {len(train)} clean" in lines
    )
    assert f"  val        : {len(val):>11,d} examples in 2 shard files, {len(val)} clean" in lines
    assert any(line.startswith("  classes: 5 (train images per class: min ") for line in lines)
    assert "  skipped images: 0" in lines


@pytest.mark.e2e
def test_describe_reads_a_training_batch(full):
    # The folder above the build: what a config's data_dir may name.
    text = describe_dataset.describe(os.path.dirname(full), image_size=24)
    lines = text.splitlines()
    assert lines[0] == f"build: {full} (gldv2/full_val{VAL_FRACTION:g}/1.0.0)"
    assert f"  nonlandmark: {NUM_NONLANDMARK:>11,d} examples in 2 shard files" in lines
    assert lines[-1].startswith("  train batch on 8 cpu device(s): image uint8[8, 24, 24, 3]")


# ------------------------------------------------------- EXIF orientation

# What each EXIF orientation asks of the stored pixels to show them upright
# (the TIFF/EXIF definitions, written out with numpy): (stored -> upright).
_UPRIGHT = {
    1: lambda s: s,
    2: lambda s: s[:, ::-1],  # mirrored left-right
    3: lambda s: s[::-1, ::-1],  # rotated 180
    4: lambda s: s[::-1],  # mirrored top-bottom
    5: lambda s: s.transpose(1, 0, 2),  # mirrored along the main diagonal
    6: lambda s: np.rot90(s, -1),  # turned 90 degrees clockwise
    7: lambda s: s[::-1, ::-1].transpose(1, 0, 2),  # along the anti-diagonal
    8: lambda s: np.rot90(s, 1),  # turned 90 degrees counter-clockwise
}
# Its inverse: the pixels a camera stores for an upright picture.
_STORED = {
    1: lambda u: u,
    2: lambda u: u[:, ::-1],
    3: lambda u: u[::-1, ::-1],
    4: lambda u: u[::-1],
    5: lambda u: u.transpose(1, 0, 2),
    6: lambda u: np.rot90(u, 1),
    7: lambda u: u[::-1, ::-1].transpose(1, 0, 2),
    8: lambda u: np.rot90(u, -1),
}


def _upright_picture() -> np.ndarray:
    """32x48 RGB, four flat quadrants of different colours: any flip or turn
    moves a colour to another corner, by ~150 grey levels. Their edges lie on
    JPEG's 8x8 blocks in every orientation, so the codec adds little."""
    picture = np.zeros((32, 48, 3), np.uint8)
    picture[:16, :24] = (200, 30, 30)
    picture[:16, 24:] = (30, 200, 30)
    picture[16:, :24] = (30, 30, 200)
    picture[16:, 24:] = (220, 220, 40)
    return picture


def _oriented_jpeg(path, stored: np.ndarray, orientation: int | None) -> None:
    exif = Image.Exif()
    if orientation is not None:
        exif[0x0112] = orientation
    Image.fromarray(np.ascontiguousarray(stored)).save(
        path, format="JPEG", quality=100, subsampling=0, exif=exif.tobytes()
    )


def _decoded(data: bytes) -> np.ndarray:
    # TF's decoder, the pipeline's: it never applies EXIF orientation itself.
    return tf.io.decode_jpeg(data, channels=3).numpy().astype(float)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_turns_the_stored_pixels_upright(orientation, tmp_path):
    upright = _upright_picture()
    assert np.array_equal(_UPRIGHT[orientation](_STORED[orientation](upright)), upright)
    stored = _STORED[orientation](upright)
    path = str(tmp_path / f"o{orientation}.jpg")
    _oriented_jpeg(path, stored, orientation)

    turned = _decoded(image_encoding.encode_image(path, exif_orientation=True))
    assert turned.shape == upright.shape  # 32x48 again for 5-8 (stored 48x32)
    assert np.abs(turned - upright).max() <= 4, np.abs(turned - upright).max()
    # Without the option the file is stored as it is: TF shows the stored pixels.
    raw = image_encoding.encode_image(path)
    assert raw == open(path, "rb").read()
    np.testing.assert_array_equal(_decoded(raw), _decoded(open(path, "rb").read()))
    if orientation != 1:
        assert np.abs(_decoded(raw) - _UPRIGHT[1](stored)).max() < 12
        assert turned.shape != stored.shape or np.abs(turned - stored).max() > 100
    else:  # orientation 1 (as stored) keeps the file byte for byte
        assert image_encoding.encode_image(path, exif_orientation=True) == raw


def test_exif_orientation_leaves_untagged_and_other_images_as_they_are(tmp_path):
    upright = _upright_picture()
    plain = str(tmp_path / "plain.jpg")
    _oriented_jpeg(plain, upright, None)
    assert image_encoding.encode_image(plain, exif_orientation=True) == open(plain, "rb").read()
    # A grayscale JPEG turned 90 degrees: converted to RGB and turned upright.
    gray = str(tmp_path / "gray.jpg")
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(np.ascontiguousarray(_STORED[6](upright)[..., 0])).save(
        gray, format="JPEG", quality=100, exif=exif.tobytes()
    )
    turned = _decoded(image_encoding.encode_image(gray, exif_orientation=True))
    assert np.abs(turned[..., 0] - upright[..., 0]).max() < 12


@pytest.mark.e2e
def test_a_build_with_exif_orientation_stores_tagged_images_upright(tmp_path):
    """`gldv2/clean/exif_orientation=True` (the --dataset value): its own
    folder, the tagged image upright, every other RGB JPEG byte for byte."""
    root = str(tmp_path / "raw")
    ids = tiny_gldv2.make_tiny_gldv2(root, num_landmarks=2, num_index=1, num_test=1)
    turned_id = sorted(ids["clean"])[0]
    path = tiny_gldv2.image_path(root, "train", turned_id)
    upright = np.asarray(Image.open(path).convert("RGB"))
    _oriented_jpeg(path, _STORED[6](upright), 6)  # as a camera held sideways stores it

    out = build("gldv2/clean/exif_orientation=True", str(tmp_path / "tfds"), root, val_fraction=0.0)
    # val_fraction 0 names the folder clean_val0 (build_dataset), and EXIF adds _exif.
    assert out.endswith(os.path.join("gldv2", "clean_val0_exif", "1.0.0"))
    assert metadata(out)["source"]["exif_orientation"] is True
    rows = {r["id"]: r["image"] for r in read_records(out, "train")}
    assert sorted(rows) == sorted(ids["clean"])
    turned = _decoded(rows[turned_id])
    assert turned.shape == upright.shape  # stored sideways, now upright
    # The source JPEG's own codec error, plus one re-encoding at quality 95.
    assert np.abs(turned - upright).mean() < 3, np.abs(turned - upright).mean()
    for image_id, data in rows.items():
        if image_id != turned_id:
            assert data == open(tiny_gldv2.image_path(root, "train", image_id), "rb").read()
