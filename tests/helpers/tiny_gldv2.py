"""A tiny GLDv2-layout tree for builder and pipeline tests.

Each image is a small random picture of random size. Optional unusual files:
a grayscale JPEG, a PNG, a CMYK JPEG (all valid and convertible), a missing
file and a truncated (corrupt) JPEG.
"""

from __future__ import annotations

import csv
import io
import os

import numpy as np
from PIL import Image


def image_path(root: str, split: str, image_id: str, ext: str = ".jpg") -> str:
    return os.path.join(root, split, image_id[0], image_id[1], image_id[2], image_id + ext)


def _write(path: str, image: Image.Image, fmt: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    image.save(path, format=fmt, quality=95)


def _picture(rng: np.random.Generator, landmark: int) -> np.ndarray:
    h, w = rng.integers(24, 48, size=2)
    # A smooth colour gradient plus noise: asymmetric, so a flip is visible.
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    base = np.stack([xx, yy, (xx + yy) / 2], -1) * 200 + 25 * (landmark % 3)
    return np.clip(base + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)


def make_tiny_gldv2(
    root: str,
    *,
    num_landmarks: int = 6,
    images_per_landmark: int = 6,
    noisy_per_landmark: int = 1,
    num_index: int = 10,
    num_test: int = 7,
    special: bool = False,
    missing: bool = False,
    corrupt: bool = False,
    seed: int = 0,
) -> dict:
    """Writes train.csv, train_clean.csv, index.csv, test.csv and the images.

    Landmark ids are spaced (100, 107, ...) so relabelling is visible. Each
    landmark has `images_per_landmark` clean images and `noisy_per_landmark`
    images only in train.csv (not clean).

    Returns:
      A dict with the id lists: 'train' (id -> landmark_id), 'clean' (set),
      'index', 'test', and 'special' (kind -> id) / 'missing' / 'corrupt'.
    """
    rng = np.random.default_rng(seed)
    ids = iter(f"{x:016x}" for x in rng.choice(2**62, size=10_000, replace=False))
    train: dict[str, int] = {}
    clean: set[str] = set()
    out: dict = {"special": {}}
    for k in range(num_landmarks):
        landmark_id = 100 + 7 * k
        for j in range(images_per_landmark + noisy_per_landmark):
            image_id = next(ids)
            train[image_id] = landmark_id
            if j < images_per_landmark:
                clean.add(image_id)
            _write(image_path(root, "train", image_id), Image.fromarray(_picture(rng, k)), "JPEG")
    # Valid but unusual files, all under clean landmarks' rows.
    train_ids = list(train)
    if special:
        gray_id, png_id, cmyk_id = train_ids[0], train_ids[1], train_ids[2]
        pic = Image.fromarray(_picture(rng, 0))
        _write(image_path(root, "train", gray_id), pic.convert("L"), "JPEG")
        os.remove(image_path(root, "train", png_id))
        _write(image_path(root, "train", png_id, ".png"), pic, "PNG")
        _write(image_path(root, "train", cmyk_id), pic.convert("CMYK"), "JPEG")
        out["special"] = {"gray": gray_id, "png": png_id, "cmyk": cmyk_id}
    if missing:
        out["missing"] = train_ids[3]
        os.remove(image_path(root, "train", train_ids[3]))
    if corrupt:
        out["corrupt"] = train_ids[4]
        buf = io.BytesIO()
        Image.fromarray(_picture(rng, 0)).save(buf, format="JPEG")
        with open(image_path(root, "train", train_ids[4]), "wb") as f:
            f.write(buf.getvalue()[: len(buf.getvalue()) // 3])

    with open(os.path.join(root, "train.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "url", "landmark_id"])
        w.writerows([i, f"demo://{i}", lm] for i, lm in train.items())
    with open(os.path.join(root, "train_clean.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["landmark_id", "images"])
        for lm in sorted(set(train.values())):
            w.writerow([lm, " ".join(i for i in train if train[i] == lm and i in clean)])
    for split, n in (("index", num_index), ("test", num_test)):
        split_ids = [next(ids) for _ in range(n)]
        for i in split_ids:
            _write(image_path(root, split, i), Image.fromarray(_picture(rng, 0)), "JPEG")
        with open(os.path.join(root, f"{split}.csv"), "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["id"])
            w.writerows([i] for i in split_ids)
        out[split] = split_ids
    out["train"] = train
    out["clean"] = clean
    return out
