"""Tests for the synthetic GLDv2-layout demo data set (data_pipelines.make_demo_dataset)."""

from __future__ import annotations

import csv
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from data_pipelines import demo_layout, demo_plan
from data_pipelines import make_demo_dataset as demo

TINY = dict(
    num_landmarks=6,
    num_index_landmarks=4,
    max_images_per_landmark=8,
    image_size=64,
    num_non_landmark_references=5,
    seed=3,
    num_workers=1,
)
HEADERS = {
    "train.csv": ["id", "url", "landmark_id"],
    "train_clean.csv": ["landmark_id", "images"],
    "index.csv": ["id"],
    "test.csv": ["id"],
    "nonlandmark.csv": ["id"],
    "retrieval_solution.csv": ["id", "images", "Usage"],
    "recognition_solution.csv": ["id", "landmarks", "Usage"],
    "index_image_to_landmark.csv": ["id", "landmark_id"],
}
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _read(root: str, name: str) -> list[dict[str, str]]:
    with open(os.path.join(root, name), newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _ids(root: str, split: str) -> list[str]:
    return [row["id"] for row in _read(root, f"{split}.csv")]


def _pixels(root: str, split: str, image_id: str) -> np.ndarray:
    with Image.open(demo_layout.image_path(os.path.join(root, split), image_id)) as image:
        return np.asarray(image.convert("RGB"))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[str, dict]:
    root = str(tmp_path_factory.mktemp("demo") / "raw")
    return root, demo.make_demo_dataset(root, **TINY)


def test_files_and_headers_are_gldv2(tiny):
    root, _ = tiny
    assert sorted(os.listdir(root)) == sorted([*HEADERS, "train", "index", "test", "nonlandmark"])
    for name, header in HEADERS.items():
        with open(os.path.join(root, name), newline="") as f:
            assert next(csv.reader(f)) == header, name


def test_ids_are_16_hex_and_unique_across_splits(tiny):
    root, summary = tiny
    all_ids = [i for split in demo_layout.SPLITS for i in _ids(root, split)]
    assert all(re.fullmatch(r"[0-9a-f]{16}", i) for i in all_ids)
    assert len(set(all_ids)) == len(all_ids) == summary["total_images"]


def test_image_tree_matches_the_csvs_exactly(tiny):
    root, _ = tiny
    for split in demo_layout.SPLITS:
        on_disk = set()
        for folder, _, files in os.walk(os.path.join(root, split)):
            for name in files:
                image_id = name.removesuffix(".jpg")
                # <split>/a/b/c/<id>.jpg with a, b, c the id's first characters.
                assert os.path.relpath(folder, os.path.join(root, split)).split(os.sep) == list(
                    image_id[:3]
                )
                on_disk.add(image_id)
        assert on_disk == set(_ids(root, split)), split


def test_images_are_rgb_jpegs_of_varied_shapes(tiny):
    root, _ = tiny
    shapes = set()
    for split in demo_layout.SPLITS:
        for image_id in _ids(root, split):
            with Image.open(demo_layout.image_path(os.path.join(root, split), image_id)) as image:
                assert image.format == "JPEG" and image.mode == "RGB"
                assert 48 <= max(image.size) <= 64
                shapes.add(image.size)
    assert len(shapes) > 5


def test_train_clean_subset_and_noise(tiny):
    root, summary = tiny
    train = {row["id"]: int(row["landmark_id"]) for row in _read(root, "train.csv")}
    clean = {
        int(row["landmark_id"]): row["images"].split() for row in _read(root, "train_clean.csv")
    }
    assert set(clean) == set(train.values())  # no class lives in the noise only
    for landmark_id, ids in clean.items():
        assert len(ids) >= 2
        assert all(train[i] == landmark_id for i in ids)
    clean_ids = {i for ids in clean.values() for i in ids}
    noisy = set(train) - clean_ids
    assert noisy and clean_ids <= set(train)
    assert len(clean_ids) == summary["train_clean_images"]
    for kind in ("correct", "mislabelled", "distractor"):
        assert summary[f"train_noisy_{kind}"] > 0
    assert summary["train_noisy_correct"] + summary["train_noisy_mislabelled"] + summary[
        "train_noisy_distractor"
    ] == len(noisy)


def test_nonlandmark_split_holds_its_own_non_landmark_scenes(tiny):
    root, summary = tiny
    ids = _ids(root, "nonlandmark")
    assert len(ids) == summary["nonlandmark_images"] == TINY["num_non_landmark_references"]
    listed = {
        row["id"]
        for name in ("train.csv", "index_image_to_landmark.csv")
        for row in _read(root, name)
    }
    recognition = {row["id"]: row["landmarks"] for row in _read(root, "recognition_solution.csv")}
    assert not set(ids) & (listed | set(recognition))
    # The other splits do not depend on the size of the reference set.
    other = str(os.path.join(os.path.dirname(root), "fewer_references"))
    demo.make_demo_dataset(other, **{**TINY, "num_non_landmark_references": 1})
    for name in ("train.csv", "index.csv", "test.csv", "recognition_solution.csv"):
        assert _read(root, name) == _read(other, name), name
    assert len(_ids(other, "nonlandmark")) == 1


def test_index_and_test_landmarks_are_disjoint_from_train(tiny):
    root, _ = tiny
    train_landmarks = {int(row["landmark_id"]) for row in _read(root, "train.csv")}
    index_labels = _read(root, "index_image_to_landmark.csv")
    index_landmarks = {int(row["landmark_id"]) for row in index_labels}
    assert len(index_landmarks) == TINY["num_index_landmarks"]
    assert not train_landmarks & index_landmarks
    assert {row["id"] for row in index_labels} < set(_ids(root, "index"))  # plus distractors


def test_solutions_follow_gldv2_conventions(tiny):
    root, _ = tiny
    test_ids = _ids(root, "test")
    retrieval = _read(root, "retrieval_solution.csv")
    recognition = _read(root, "recognition_solution.csv")
    assert [row["id"] for row in retrieval] == test_ids
    assert [row["id"] for row in recognition] == test_ids
    index_of: dict[str, list[str]] = {}
    for row in _read(root, "index_image_to_landmark.csv"):
        index_of.setdefault(row["landmark_id"], []).append(row["id"])
    train_landmarks = {row["landmark_id"] for row in _read(root, "train.csv")}
    roles = {"query": 0, "recognition": 0, "distractor": 0}
    for ret, rec in zip(retrieval, recognition, strict=True):
        assert rec["Usage"] in ("Public", "Private")
        if ret["Usage"] == "Ignored":
            assert ret["images"] == "None"
        else:
            # A query: its ground truth is every index image of one landmark.
            assert ret["Usage"] == rec["Usage"]
            assert sorted(ret["images"].split()) in [sorted(v) for v in index_of.values()]
            assert rec["landmarks"] == ""  # index landmarks are not train classes
            roles["query"] += 1
            continue
        if rec["landmarks"]:
            assert set(rec["landmarks"].split()) <= train_landmarks
            roles["recognition"] += 1
        else:
            roles["distractor"] += 1
    assert all(roles.values()), roles
    usages = {row["Usage"] for row in retrieval if row["Usage"] != "Ignored"}
    assert usages == {"Public", "Private"}


def test_same_seed_same_data_set_whatever_the_workers(tiny, tmp_path):
    root, summary = tiny
    again = str(tmp_path / "again")
    # Two spawned workers must render exactly what one process rendered.
    summary_again = demo.make_demo_dataset(again, **{**TINY, "num_workers": 2})
    for name in HEADERS:
        with open(os.path.join(root, name), "rb") as a, open(os.path.join(again, name), "rb") as b:
            assert a.read() == b.read(), name
    for split in demo_layout.SPLITS:
        for image_id in _ids(root, split):
            np.testing.assert_array_equal(
                _pixels(root, split, image_id), _pixels(again, split, image_id)
            )
    assert {k: v for k, v in summary.items() if k not in ("seconds", "output_dir")} == {
        k: v for k, v in summary_again.items() if k not in ("seconds", "output_dir")
    }
    other = str(tmp_path / "other")
    demo.make_demo_dataset(other, **{**TINY, "seed": 4})
    assert _ids(other, "train") != _ids(root, "train")


def test_refuses_a_non_empty_folder_unless_overwrite(tmp_path):
    root = str(tmp_path / "raw")
    small = {**TINY, "num_landmarks": 2, "num_index_landmarks": 2, "max_images_per_landmark": 2}
    demo.make_demo_dataset(root, **small)
    keep = tmp_path / "raw" / "notes.txt"
    keep.write_text("mine")
    with pytest.raises(FileExistsError, match="overwrite"):
        demo.make_demo_dataset(root, **small)
    demo.make_demo_dataset(root, **{**small, "seed": 5}, overwrite=True)
    # The old images are gone (ids are seed-dependent) and unrelated files stay.
    n_files = sum(
        len(files) for split in demo_layout.SPLITS for _, _, files in os.walk(f"{root}/{split}")
    )
    assert n_files == sum(len(_ids(root, split)) for split in demo_layout.SPLITS)
    assert keep.read_text() == "mine"


@pytest.mark.parametrize(
    "bad, message",
    [
        (dict(num_landmarks=1), "num_landmarks"),
        (dict(num_index_landmarks=0), "num_index_landmarks"),
        (dict(max_images_per_landmark=1), "max_images_per_landmark"),
        (dict(noisy_fraction=1.0), "noisy_fraction"),
        (dict(image_size=8), "image_size"),
        (dict(seed=-1), "seed"),
    ],
)
def test_bad_arguments_are_named(tmp_path, bad, message):
    with pytest.raises(ValueError, match=message):
        demo.make_demo_dataset(str(tmp_path / "raw"), **{**TINY, **bad})
    assert not (tmp_path / "raw").exists()


def test_output_dir_that_is_a_file(tmp_path):
    path = tmp_path / "file"
    path.write_text("")
    with pytest.raises(NotADirectoryError):
        demo.make_demo_dataset(str(path), **TINY)


def test_class_sizes_are_long_tailed():
    counts = demo_plan.long_tailed_counts(80, 80, np.random.default_rng(0))
    assert counts.min() == 2 and counts.max() == 80
    assert np.median(counts) < counts.mean() < 0.4 * counts.max()  # skewed to small classes
    assert (counts <= 3).sum() >= 8


@pytest.mark.e2e
def test_command_line(tmp_path):
    root = tmp_path / "raw"
    args = ["--num_landmarks=2", "--num_index_landmarks=2", "--max_images_per_landmark=3"]
    result = subprocess.run(
        [sys.executable, "-m", "data_pipelines.make_demo_dataset", f"--output_dir={root}", *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "train:" in result.stdout and "index:" in result.stdout and "test:" in result.stdout
    assert (root / "train_clean.csv").exists()


# An independent reference descriptor: a tiny normalised grayscale thumbnail plus a
# 4x4-cell histogram of gradient orientations, both computed in numpy.
def _structure_descriptor(rgb: np.ndarray) -> np.ndarray:
    gray = Image.fromarray(rgb).convert("L")
    thumb = np.asarray(gray.resize((12, 12), Image.Resampling.BILINEAR), np.float32).ravel()
    thumb = (thumb - thumb.mean()) / (thumb.std() + 1e-6)
    g = np.asarray(gray.resize((32, 32), Image.Resampling.BILINEAR), np.float32)
    gy, gx = np.gradient(g)
    magnitude = np.hypot(gx, gy)
    bins = np.minimum((np.mod(np.arctan2(gy, gx), np.pi) / np.pi * 8).astype(int), 7)
    cells = (np.arange(32)[:, None] // 8) * 4 + np.arange(32)[None, :] // 8
    hog = np.bincount((cells * 8 + bins).ravel(), magnitude.ravel(), minlength=128)
    return np.concatenate(
        [thumb / np.linalg.norm(thumb), hog / (np.linalg.norm(hog) + 1e-6)]
    ) / np.sqrt(2)


def _leave_one_out_nn_accuracy(similarity: np.ndarray, labels: np.ndarray) -> float:
    similarity = similarity.copy()
    np.fill_diagonal(similarity, -np.inf)
    return float((labels[similarity.argmax(1)] == labels).mean())


def test_learnable_but_not_trivial(tmp_path):
    root = str(tmp_path / "raw")
    demo.make_demo_dataset(
        root,
        num_landmarks=20,
        num_index_landmarks=2,
        max_images_per_landmark=12,
        image_size=64,
        seed=0,
        num_workers=1,
    )
    ids, labels = [], []
    for row in _read(root, "train_clean.csv"):
        ids += row["images"].split()
        labels += [int(row["landmark_id"])] * len(row["images"].split())
    labels = np.array(labels)
    chance = 1 / 20
    pixels = [_pixels(root, "train", i) for i in ids]

    structure = np.stack([_structure_descriptor(p) for p in pixels])
    similarity = structure @ structure.T
    same = labels[:, None] == labels[None, :]
    off_diagonal = ~np.eye(len(ids), dtype=bool)
    assert similarity[same & off_diagonal].mean() > similarity[~same].mean() + 0.02
    structure_acc = _leave_one_out_nn_accuracy(similarity, labels)

    colour = np.stack([p.reshape(-1, 3).mean(0) for p in pixels])
    colour_acc = _leave_one_out_nn_accuracy(
        -np.linalg.norm(colour[:, None] - colour[None], axis=-1), labels
    )
    # Structure identifies landmarks well above chance but is far from solving
    # them; mean colour alone is close to chance.
    assert 3 * chance < structure_acc < 0.9, structure_acc
    assert colour_acc < 4 * chance, colour_acc
    assert structure_acc > 2 * colour_acc, (structure_acc, colour_acc)
