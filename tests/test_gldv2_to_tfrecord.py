"""The GLDv2 -> TFRecord builder on tiny generated GLDv2 trees."""

import collections
import csv
import hashlib
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from data_pipelines import gldv2_csv, gldv2_to_tfrecord, tfrecord_shard
from landmark_jax import data_format

import tiny_gldv2


def read_records(out_dir: str, split: str) -> list[dict]:
    """Every example of a split, parsed with protobuf (not our pipeline)."""
    info = json.load(open(os.path.join(out_dir, "dataset_info.json")))
    rows = []
    for entry in info["splits"][split]["files"]:
        path = os.path.join(out_dir, entry["name"])
        n = 0
        for raw in tf.data.TFRecordDataset(path).as_numpy_iterator():
            feats = tf.train.Example.FromString(raw).features.feature
            row = {k: (v.bytes_list.value or v.int64_list.value)[0] for k, v in feats.items()}
            row["file"] = entry["name"]
            rows.append(row)
            n += 1
        assert n == entry["num_examples"], path
    return rows


def build_train(root, out, **kwargs):
    args = dict(clean_csv=f"{root}/train_clean.csv", val_fraction=0.25, num_workers=1)
    args.update(kwargs)
    return gldv2_to_tfrecord.build_split(
        "train", f"{root}/train.csv", f"{root}/train", out, 3, **args
    )


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("gldv2"))
    ids = tiny_gldv2.make_tiny_gldv2(root, special=True)
    return root, ids


def test_train_split_labels_clean_flags_and_counts(tree, tmp_path):
    root, ids = tree
    out = str(tmp_path)
    summary = build_train(root, out)
    train, val = read_records(out, "train"), read_records(out, "val")

    # Every image of train.csv is written exactly once, in train or val.
    written = [r[data_format.ID].decode() for r in train + val]
    assert sorted(written) == sorted(ids["train"])
    assert summary["splits"]["train"]["num_examples"] == len(train)
    assert summary["splits"]["val"]["num_examples"] == len(val)

    # Labels are contiguous 0..C-1 in landmark-id order and match label_map.csv.
    landmarks = sorted(set(ids["train"].values()))
    label_map = data_format.read_label_map(out)
    np.testing.assert_array_equal(label_map.landmark_ids, landmarks)
    for r in train + val:
        landmark = ids["train"][r[data_format.ID].decode()]
        assert r[data_format.LANDMARK_ID] == landmark
        assert r[data_format.LABEL] == landmarks.index(landmark)
        assert r[data_format.IS_CLEAN] == int(r[data_format.ID].decode() in ids["clean"])

    # label_map counts are the training examples per class; none is empty.
    counts = np.bincount([r[data_format.LABEL] for r in train], minlength=len(landmarks))
    np.testing.assert_array_equal(label_map.counts, counts)
    clean_counts = np.bincount(
        [r[data_format.LABEL] for r in train if r[data_format.IS_CLEAN]], minlength=len(landmarks)
    )
    np.testing.assert_array_equal(label_map.clean_counts, clean_counts)
    assert counts.min() >= 1
    # Validation holds only clean images, about val_fraction of them.
    assert all(r[data_format.IS_CLEAN] == 1 for r in val)
    assert 0.1 < len(val) / len(ids["clean"]) < 0.4
    info = json.load(open(os.path.join(out, "dataset_info.json")))
    assert info["num_classes"] == len(landmarks)
    assert info["splits"]["train"]["num_clean"] == sum(r[data_format.IS_CLEAN] for r in train)


def test_label_map_train_val_columns_count_the_whole_csv(tree, tmp_path):
    root, _ = tree
    out = str(tmp_path)
    build_train(root, out)
    header = open(os.path.join(out, "label_map.csv")).readline().strip()
    assert header == "label,landmark_id,count,num_clean,train_val_count,train_val_clean"
    label_map = data_format.read_label_map(out)
    assert len(read_records(out, "val")) > 0  # else train + val would be train

    # From the CSVs, independently of the builder: every row of train.csv and
    # of train_clean.csv (nothing skipped), per landmark in label order.
    rows = list(csv.DictReader(open(f"{root}/train.csv")))
    landmarks = sorted({int(r["landmark_id"]) for r in rows})
    csv_counts = collections.Counter(int(r["landmark_id"]) for r in rows)
    csv_clean = {
        int(r["landmark_id"]): len(r["images"].split())
        for r in csv.DictReader(open(f"{root}/train_clean.csv"))
    }
    np.testing.assert_array_equal(label_map.train_val_counts, [csv_counts[lm] for lm in landmarks])
    np.testing.assert_array_equal(
        label_map.train_val_clean_counts, [csv_clean.get(lm, 0) for lm in landmarks]
    )
    # From the records: train + val per label.
    both = read_records(out, "train") + read_records(out, "val")
    labels = [r[data_format.LABEL] for r in both]
    np.testing.assert_array_equal(
        label_map.train_val_counts, np.bincount(labels, minlength=len(landmarks))
    )
    np.testing.assert_array_equal(
        label_map.train_val_clean_counts,
        np.bincount(labels, weights=[r[data_format.IS_CLEAN] for r in both]).astype(int),
    )
    # The val split took images from some classes: totals exceed train there.
    assert np.any(label_map.train_val_counts > label_map.counts)


def _drop_columns(path, columns):
    rows = list(csv.DictReader(open(path)))
    keep = [c for c in rows[0] if c not in columns]
    _rewrite(path, keep, [[r[c] for c in keep] for r in rows])


def test_label_map_without_train_val_columns(tree, tmp_path):
    root, _ = tree
    # With a val split the train counts are not n_c: an error, no fallback.
    with_val = str(tmp_path / "with_val")
    build_train(root, with_val)
    path = os.path.join(with_val, "label_map.csv")
    _drop_columns(path, {"train_val_count", "train_val_clean"})
    with pytest.raises(
        data_format.DataFormatError, match=r"label_map\.csv: no train_val_count.*rebuild the train"
    ):
        data_format.read_label_map(with_val)
    # Only one of the two columns.
    build_train(root, with_val)
    _drop_columns(path, {"train_val_clean"})
    with pytest.raises(data_format.DataFormatError, match="has train_val_count but not"):
        data_format.read_label_map(with_val)

    # Without a val split train + val is train.
    no_val = str(tmp_path / "no_val")
    build_train(root, no_val, val_fraction=0.0)
    _drop_columns(os.path.join(no_val, "label_map.csv"), {"train_val_count", "train_val_clean"})
    label_map = data_format.read_label_map(no_val)
    np.testing.assert_array_equal(label_map.train_val_counts, label_map.counts)
    np.testing.assert_array_equal(label_map.train_val_clean_counts, label_map.clean_counts)


def test_label_map_train_val_must_agree_with_dataset_info(tree, tmp_path):
    root, _ = tree
    out = str(tmp_path)
    build_train(root, out)
    path = os.path.join(out, "label_map.csv")
    rows = list(csv.DictReader(open(path)))
    rows[0]["train_val_count"] = str(int(rows[0]["train_val_count"]) + 1)
    _rewrite(path, list(rows[0]), [list(r.values()) for r in rows])
    with pytest.raises(data_format.DataFormatError, match="lists .* train \\+ val examples"):
        data_format.read_label_map(out)
    rows[0]["train_val_count"] = "0"
    _rewrite(path, list(rows[0]), [list(r.values()) for r in rows])
    with pytest.raises(data_format.DataFormatError, match="label 0 has train_val_count 0 < count"):
        data_format.read_label_map(out)


def test_unusual_images_become_rgb_jpegs(tree, tmp_path):
    root, ids = tree
    out = str(tmp_path)
    build_train(root, out)
    by_id = {
        r[data_format.ID].decode(): r for r in read_records(out, "train") + read_records(out, "val")
    }
    for kind, image_id in ids["special"].items():
        encoded = by_id[image_id][data_format.IMAGE]
        image = Image.open(io.BytesIO(encoded))
        assert (image.format, image.mode) == ("JPEG", "RGB"), kind
        ext = ".png" if kind == "png" else ".jpg"
        original = Image.open(tiny_gldv2.image_path(root, "train", image_id, ext)).convert("RGB")
        diff = np.abs(np.asarray(image, float) - np.asarray(original, float))
        assert diff.mean() < 4.0, (kind, diff.mean())
    # An ordinary RGB JPEG is copied byte for byte: no second lossy encoding.
    plain = next(i for i in ids["train"] if i not in ids["special"].values())
    with open(tiny_gldv2.image_path(root, "train", plain), "rb") as f:
        assert by_id[plain][data_format.IMAGE] == f.read()


def test_16_bit_grayscale_is_scaled_not_clipped_white(tmp_path):
    # A 16-bit gradient: PIL's own convert('RGB') would clip it to 255.
    values = np.linspace(0, 65535, 32 * 48).reshape(32, 48).astype(np.uint16)
    path = str(tmp_path / "deep.png")
    Image.fromarray(values).save(path)  # mode I;16
    assert Image.open(path).mode.startswith("I")
    decoded = np.asarray(Image.open(io.BytesIO(tfrecord_shard.encode_image(path))), float)
    assert decoded.shape == (32, 48, 3)
    np.testing.assert_allclose(decoded[..., 0], values / 257.0, atol=4.0)
    # A float image has no known 8-bit scale: refused by name.
    floats = str(tmp_path / "float.tif")
    Image.fromarray(np.full((8, 8), 1234.5, np.float32)).save(floats)  # mode F
    with pytest.raises(tfrecord_shard.BadImageError, match=rf"{floats}: a 'F' image"):
        tfrecord_shard.encode_image(floats)


def test_clean_only_keeps_clean_images(tree, tmp_path):
    root, ids = tree
    out = str(tmp_path)
    build_train(root, out, clean_only=True, val_fraction=0.0)
    train = read_records(out, "train")
    assert sorted(r[data_format.ID].decode() for r in train) == sorted(ids["clean"])
    assert not os.path.exists(os.path.join(out, "val-00000-of-00001.tfrecord"))


def test_clean_classes_only_keeps_every_image_of_the_clean_classes(tree, tmp_path):
    root, ids = tree
    # A train_clean.csv without the first class: its images are all noisy then.
    lines = open(f"{root}/train_clean.csv").read().splitlines()
    clean_csv = str(tmp_path / "train_clean.csv")
    open(clean_csv, "w").write("\n".join([lines[0], *lines[2:]]) + "\n")
    dropped = int(lines[1].split(",")[0])
    out = str(tmp_path / "out")
    build_train(root, out, clean_csv=clean_csv, clean_classes_only=True, val_fraction=0.0)
    # GLDv2x: the noisy images of the clean classes too, none of the others.
    expected = sorted(i for i, landmark in ids["train"].items() if landmark != dropped)
    clean = {i for i in ids["clean"] if ids["train"][i] != dropped}
    assert len(clean) < len(expected) < len(ids["train"])
    train = read_records(out, "train")
    assert sorted(r[data_format.ID].decode() for r in train) == expected
    assert data_format.read_num_classes(out) == len(set(ids["train"].values())) - 1
    with pytest.raises(ValueError, match="exclude each other"):
        build_train(root, out, clean_classes_only=True, clean_only=True)


def test_same_seed_same_shards_with_one_or_two_workers(tree, tmp_path):
    root, _ = tree
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    build_train(root, a, seed=3, num_workers=1)
    build_train(root, b, seed=3, num_workers=2)
    for split in ("train", "val"):
        assert read_records(a, split) == read_records(b, split)
    c = str(tmp_path / "c")
    build_train(root, c, seed=4)
    assert read_records(a, "val") != read_records(c, "val")


def test_index_split_keeps_csv_order_without_labels(tree, tmp_path):
    root, ids = tree
    out = str(tmp_path)
    build_train(root, out)
    gldv2_to_tfrecord.build_split(
        "index", f"{root}/index.csv", f"{root}/index", out, 3, num_workers=1
    )
    index = read_records(out, "index")
    assert [r[data_format.ID].decode() for r in index] == ids["index"]
    assert all(data_format.LABEL not in r for r in index)
    info = json.load(open(os.path.join(out, "dataset_info.json")))
    # Building index keeps the train entries and the class count.
    assert set(info["splits"]) == {"train", "val", "index"}
    assert info["num_classes"] == len(set(ids["train"].values()))
    # Each shard's digest: SHA-256 of its records, each prefixed by its
    # length, recomputed here from the file.
    for entry in info["splits"]["index"]["files"]:
        digest = hashlib.sha256()
        for record in tf.data.TFRecordDataset(os.path.join(out, entry["name"])):
            digest.update(len(record.numpy()).to_bytes(8, "little") + record.numpy())
        assert entry["sha256"] == digest.hexdigest()
    split = data_format.read_split_info(out, "index")
    assert [d for _, _, d in split.identity] == [
        f["sha256"] for f in info["splits"]["index"]["files"]
    ]


def test_missing_file_is_an_error_or_listed(tmp_path):
    root = str(tmp_path / "tree")
    ids = tiny_gldv2.make_tiny_gldv2(root, missing=True)
    with pytest.raises(FileNotFoundError, match=ids["missing"]):
        build_train(root, str(tmp_path / "out"))
    summary = build_train(root, str(tmp_path / "out"), skip_bad_images=True)
    assert [s[0] for s in summary["skipped"]] == [ids["missing"]]
    rows = list(csv.DictReader(open(tmp_path / "out" / "bad_images-train.csv")))
    assert [(r["id"], r["reason"]) for r in rows] == [(ids["missing"], "missing file")]
    total = summary["splits"]["train"]["num_examples"] + summary["splits"]["val"]["num_examples"]
    assert total == len(ids["train"]) - 1
    # The train + val counts are of the images written: the skipped one is out.
    assert data_format.read_label_map(str(tmp_path / "out")).train_val_counts.sum() == total


def test_corrupt_image_is_an_error_or_listed(tmp_path):
    root = str(tmp_path / "tree")
    ids = tiny_gldv2.make_tiny_gldv2(root, corrupt=True)
    path = tiny_gldv2.image_path(root, "train", ids["corrupt"])
    with pytest.raises(tfrecord_shard.BadImageError, match=path):
        build_train(root, str(tmp_path / "out"))
    summary = build_train(root, str(tmp_path / "out"), skip_bad_images=True)
    assert [(s[0], s[1]) for s in summary["skipped"]] == [(ids["corrupt"], path)]
    written = [r[data_format.ID].decode() for r in read_records(str(tmp_path / "out"), "train")]
    assert ids["corrupt"] not in written
    assert not [f for f in os.listdir(tmp_path / "out") if f.endswith(".incomplete")]


def test_a_failed_rebuild_leaves_the_previous_split_intact(tmp_path):
    root, out = str(tmp_path / "tree"), str(tmp_path / "out")
    ids = tiny_gldv2.make_tiny_gldv2(root, corrupt=True)
    build_train(root, out, skip_bad_images=True)

    def files():
        return {f: open(os.path.join(out, f), "rb").read() for f in os.listdir(out)}

    before = files()
    # Leftovers of a build that was killed are cleared by the next one.
    os.makedirs(os.path.join(out, ".staging-train-killed00"))
    with pytest.raises(tfrecord_shard.BadImageError, match=ids["corrupt"]):
        build_train(root, out)  # the corrupt image stops this one
    assert files() == {**before}  # every old file as it was, nothing new
    # A rebuild without validation removes the old val shards.
    build_train(root, out, skip_bad_images=True, val_fraction=0.0)
    assert not [f for f in os.listdir(out) if f.startswith("val-")]
    assert "val" not in json.load(open(os.path.join(out, "dataset_info.json")))["splits"]
    # Rebuilt from a tree without bad images: the old list of them goes too.
    tiny_gldv2.make_tiny_gldv2(root)
    build_train(root, out)
    assert "bad_images-train.csv" not in os.listdir(out)


def _rewrite(path, header, rows):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


def test_csv_errors_name_file_and_value(tree, tmp_path):
    root, ids = tree
    first = next(iter(ids["train"]))
    bad = str(tmp_path / "train.csv")

    _rewrite(bad, ["id", "url"], [[first, ""]])
    with pytest.raises(
        gldv2_csv.GLDv2FormatError, match=r"train\.csv.*missing column.*landmark_id"
    ):
        gldv2_csv.read_train_csv(bad)

    _rewrite(bad, ["id", "url", "landmark_id"], [[first, "", 1], [first, "", 2]])
    with pytest.raises(gldv2_csv.GLDv2FormatError, match=f"duplicate.*{first}"):
        gldv2_csv.read_train_csv(bad)

    _rewrite(bad, ["id", "url", "landmark_id"], [[first, "", "abc"]])
    with pytest.raises(gldv2_csv.GLDv2FormatError, match=r"train\.csv:2: landmark_id 'abc'"):
        gldv2_csv.read_train_csv(bad)

    # A Latin-1 byte on line 3: the file, line and offset are named.
    with open(bad, "wb") as f:
        f.write(f"id,url,landmark_id\n{first},,1\nx\xe9,,2\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"train\.csv:3: byte 0xe9 at offset \d+ is not UTF-8"):
        gldv2_csv.read_train_csv(bad)

    clean = str(tmp_path / "clean.csv")
    _rewrite(clean, ["landmark_id", "images"], [[100, "ffffffffffffffff"]])
    with pytest.raises(gldv2_csv.GLDv2FormatError, match="ffffffffffffffff"):
        build_train(root, str(tmp_path / "out"), clean_csv=clean)

    with pytest.raises(ValueError, match="apply to --split=train"):
        gldv2_to_tfrecord.build_split(
            "index",
            f"{root}/index.csv",
            f"{root}/index",
            str(tmp_path / "o"),
            1,
            clean_csv=f"{root}/train_clean.csv",
        )


def test_command_line_end_to_end(tree, tmp_path):
    root, ids = tree
    out = str(tmp_path / "out")
    cmd = [
        sys.executable,
        "-m",
        "data_pipelines.gldv2_to_tfrecord",
        "--split=test",
        f"--csv={root}/test.csv",
        f"--images_dir={root}/test",
        f"--output_dir={out}",
        "--num_shards=2",
        "--num_workers=1",
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert f"test :{len(ids['test']):>10,d} examples in 2 files" in result.stdout
    assert [r[data_format.ID].decode() for r in read_records(out, "test")] == ids["test"]
    assert sorted(os.listdir(out)) == [
        ".dataset_info.lock",  # the builders' lock (held while a build merges its splits)
        "dataset_info.json",
        "test-00000-of-00002.tfrecord",
        "test-00001-of-00002.tfrecord",
    ]
