"""A tiny Revisited Oxford/Paris-style set: 12 database and 3 query JPEGs and a gnd pickle,
laid out as the revisited_oxford_paris builder's manual dir (cirtorch's data/test/roxford5k/)."""

import pickle

import numpy as np
from PIL import Image

NUM_DB = 12
# Query boxes: one float box, one spilling over the image edge (clamped), one
# whole-image box.
BOXES = ([5.4, 6.6, 41.2, 30.5], [20, -7, 90, 33], [0, 0, 64, 48])
EXPECTED_BOXES = ((5, 7, 41, 30), (20, 0, 64, 33), (0, 0, 64, 48))


def _image(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """A smooth coloured image (JPEG keeps it within a few grey levels)."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = rng.uniform(30, 220, size=3)
    slope = rng.uniform(-2, 2, size=(2, 3))
    pixels = base + x[..., None] * slope[0] + y[..., None] * slope[1]
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def make_tiny_set(tmp_path, gnd_file: str = "gnd_roxford5k.pkl") -> dict:
    """12 database and 3 query JPEGs in tmp_path/jpg with a hand-made gnd pickle beside them.

    Returns:
      {'manual_dir': tmp_path, 'gnd': the pickle, 'images': the jpg folder,
      'data': the pickled ground truth}.
    """
    rng = np.random.default_rng(0)
    images = tmp_path / "jpg"
    images.mkdir(parents=True)
    imlist = [f"db_{i:02d}" for i in range(NUM_DB)]
    qimlist = ["query_a", "query_b", "query_c"]
    for name in imlist:
        _image(rng, 56 + int(rng.integers(0, 16)), 40).save(images / f"{name}.jpg", quality=95)
    for name in qimlist:
        _image(rng, 64, 48).save(images / f"{name}.jpg", quality=95)
    gnd = {
        "imlist": imlist,
        "qimlist": qimlist,
        "gnd": [
            {"bbx": BOXES[0], "easy": [0, 1], "hard": [2], "junk": [3]},
            {"bbx": BOXES[1], "easy": [4], "hard": [5, 6], "junk": []},
            {"bbx": BOXES[2], "easy": [7, 8, 9], "hard": [], "junk": [10, 11]},
        ],
    }
    gnd_path = tmp_path / gnd_file
    with open(gnd_path, "wb") as f:
        pickle.dump(gnd, f)
    return {"manual_dir": str(tmp_path), "gnd": str(gnd_path), "images": str(images), "data": gnd}
