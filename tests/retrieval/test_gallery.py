"""Gallery: reading images by id from TFRecords, the PNG grid, the choice of queries."""

from __future__ import annotations

import io
import os

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image

from landmark_jax.data import data_format
from landmark_jax.retrieval import gallery

# id -> (colour, (width, height)). Sizes differ so letterboxing and
# thumbnailing are exercised; colours are far apart so JPEG error is harmless.
INDEX = {
    "idx_red": ((200, 30, 30), (40, 30)),
    "idx_green": ((30, 200, 30), (30, 50)),
    "idx_blue": ((30, 30, 200), (32, 32)),
    "idx_yellow": ((220, 210, 40), (200, 100)),
    "idx_cyan": ((40, 200, 210), (36, 36)),
    "idx_purple": ((140, 40, 160), (36, 36)),
}
TEST = {
    "q_gray": ((128, 128, 128), (40, 40)),
    "q_orange": ((240, 140, 20), (60, 30)),
}
TOLERANCE = 12  # JPEG error on a solid colour, plus chroma subsampling


def _jpeg(color, size, mode="RGB") -> bytes:
    buffer = io.BytesIO()
    image = Image.new("RGB", size, color)
    if mode == "L":
        image = image.convert("L")
    image.save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def _example(image_id: str, encoded: bytes) -> bytes:
    def feature(value: bytes) -> tf.train.Feature:
        return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))

    features = {data_format.ID: feature(image_id.encode()), data_format.IMAGE: feature(encoded)}
    return tf.train.Example(features=tf.train.Features(feature=features)).SerializeToString()


def _write_split(root: str, split: str, shards: list[list[tuple[str, bytes]]]) -> None:
    """Shards named as TFDS names them, written by hand (the ids and images chosen)."""
    for n, records in enumerate(shards):
        name = f"gallery-{split}.tfrecord-{n:05d}-of-{len(shards):05d}"
        with tf.io.TFRecordWriter(os.path.join(root, name)) as writer:
            for image_id, encoded in records:
                writer.write(_example(image_id, encoded))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> str:
    root = str(tmp_path_factory.mktemp("gallery_data") / "gallery" / "1.0.0")
    os.makedirs(root)
    index = [(i, _jpeg(c, s)) for i, (c, s) in INDEX.items()]
    test = [(i, _jpeg(c, s)) for i, (c, s) in TEST.items()]
    test.append(("q_gray_l", _jpeg((90, 90, 90), (20, 20), mode="L")))  # 1-channel JPEG
    _write_split(root, "index", [index[:3], index[3:]])
    _write_split(root, "test", [test])
    # TFDS's metadata for the files (split names and shard lengths read from them).
    features = tfds.features.FeaturesDict(
        {data_format.IMAGE: tfds.features.Image(), data_format.ID: tfds.features.Text()}
    )
    tfds.folder_dataset.write_metadata(data_dir=root, features=features)
    return root


def _mean_color(image: Image.Image, box=None) -> np.ndarray:
    array = np.asarray(image.convert("RGB"), np.float64)
    if box is not None:
        left, top, right, bottom = box
        array = array[top:bottom, left:right]
    return array.reshape(-1, 3).mean(0)


def _close(actual, expected, tolerance=TOLERANCE) -> bool:
    return bool(np.all(np.abs(np.asarray(actual, float) - np.asarray(expected)) <= tolerance))


def test_read_images_by_id_returns_the_right_images(data_dir):
    wanted = ["idx_green", "idx_yellow", "idx_red", "idx_green"]  # both shards, a repeat
    images = gallery.read_images_by_id(data_dir, "index", wanted, max_side=64)
    assert set(images) == {"idx_green", "idx_yellow", "idx_red"}
    for image_id, image in images.items():
        assert image.mode == "RGB"
        assert _close(_mean_color(image), INDEX[image_id][0]), image_id
    assert images["idx_yellow"].size == (64, 32)  # thumbnailed, aspect kept
    assert images["idx_red"].size == (40, 30)  # small images are not upscaled
    gray = gallery.read_images_by_id(data_dir, "test", ["q_gray_l"])["q_gray_l"]
    assert gray.mode == "RGB" and _close(_mean_color(gray), (90, 90, 90))
    assert gallery.read_images_by_id(data_dir, "index", []) == {}


def test_read_images_by_id_names_missing_ids_and_split(data_dir):
    with pytest.raises(KeyError, match=r"nope.*'index'|'index'.*nope"):
        gallery.read_images_by_id(data_dir, "index", ["idx_red", "nope"])
    # A test id is not in the index split.
    with pytest.raises(KeyError, match="q_gray"):
        gallery.read_images_by_id(data_dir, "index", ["q_gray"])
    with pytest.raises(data_format.DataFormatError, match="train"):
        gallery.read_images_by_id(data_dir, "train", ["idx_red"])


def _solid(image_id: str) -> Image.Image:
    color, size = {**INDEX, **TEST}[image_id]
    return Image.new("RGB", size, color)


def _rows() -> list[gallery.GalleryRow]:
    return [
        gallery.GalleryRow(
            "q_gray",
            _solid("q_gray"),
            [
                ("idx_red", _solid("idx_red"), True),
                ("idx_green", _solid("idx_green"), False),
                ("idx_blue", _solid("idx_blue"), None),
            ],
            caption="AP@100 0.333",
        ),
        # Fewer results than columns; a wide query image (letterboxed).
        gallery.GalleryRow(
            "q_orange", _solid("q_orange"), [("idx_yellow", _solid("idx_yellow"), False)]
        ),
    ]


def _frame_pixels(canvas: np.ndarray, box) -> np.ndarray:
    """The frame's pixels, halfway along each of its four sides."""
    left, top, right, bottom = box
    mid_x, mid_y, inset = (left + right) // 2, (top + bottom) // 2, gallery.FRAME // 2
    return np.stack(
        [
            canvas[top + inset, mid_x],
            canvas[bottom - 1 - inset, mid_x],
            canvas[mid_y, left + inset],
            canvas[mid_y, right - 1 - inset],
        ]
    ).astype(int)


def test_render_gallery_draws_frames_and_thumbnails(tmp_path):
    path = str(tmp_path / "eval" / "gallery.png")  # the parent folder is created
    thumb, max_results = 40, 3
    gallery.render_gallery(_rows(), path, thumb=thumb, max_results=max_results, title="demo")
    assert os.path.exists(path)
    image = Image.open(path)
    assert image.format == "PNG" and image.mode == "RGB"

    g = gallery
    cell = thumb + 2 * g.FRAME
    width = g.GAP + (1 + max_results) * (cell + g.GAP) + g.QUERY_GAP
    row_height = g.GAP + cell + g.LABEL_LINES * g.LINE_HEIGHT
    height = g.GAP + 2 * g.LINE_HEIGHT + 2 * row_height + g.GAP
    assert image.size == (width, height)

    layout = g.GalleryLayout(thumb, max_results, has_title=True)
    assert layout.size(2) == image.size
    canvas = np.asarray(image)
    frames = {(r, c): _frame_pixels(canvas, layout.frame_box(r, c)) for r, c in
              [(0, 0), (0, 1), (0, 2), (0, 3), (1, 0), (1, 1)]}  # fmt: skip
    assert (frames[0, 1][:, 1] > 140).all() and (frames[0, 1][:, 0] < 80).all()  # correct
    assert (frames[0, 2][:, 0] > 180).all() and (frames[0, 2][:, 1] < 80).all()  # wrong
    assert (frames[1, 1][:, 0] > 180).all() and (frames[1, 1][:, 1] < 80).all()  # wrong
    for key, color in [((0, 3), g.UNKNOWN_COLOR), ((0, 0), g.QUERY_COLOR), ((1, 0), g.QUERY_COLOR)]:
        assert (frames[key] == color).all(), key

    # Thumbnail interiors carry the source colours (centre patch: letterboxing
    # only adds bars at the edges).
    def centre(r, c):
        left, top, right, bottom = layout.thumb_box(r, c)
        q = thumb // 4
        return _mean_color(image, (left + q, top + q, right - q, bottom - q))

    for (r, c), image_id in {
        (0, 0): "q_gray",
        (0, 1): "idx_red",
        (0, 2): "idx_green",
        (0, 3): "idx_blue",
        (1, 0): "q_orange",
        (1, 1): "idx_yellow",
    }.items():
        assert _close(centre(r, c), {**INDEX, **TEST}[image_id][0], 2), image_id

    # Letterbox: the 2:1 query's thumbnail has bars above and below, and the
    # image spans the full width.
    left, top, right, bottom = layout.thumb_box(1, 0)
    assert (canvas[top + 1, (left + right) // 2] == g.LETTERBOX).all()
    assert _close(canvas[(top + bottom) // 2, left + 1], TEST["q_orange"][0], 2)
    # Empty cells after a short row are background; labels draw dark text.
    left, top, right, bottom = layout.frame_box(1, 2)
    assert (canvas[top:bottom, left:right] == g.BACKGROUND).all()
    left, _, right, bottom = layout.frame_box(0, 1)
    assert canvas[bottom : bottom + 2 * g.LINE_HEIGHT, left:right].min() < 100


def test_render_gallery_layout_without_title_and_with_extra_results(tmp_path):
    path = str(tmp_path / "g.png")
    many = [(f"r{i}", Image.new("L", (10, 10), 200), i % 2 == 0) for i in range(5)]
    gallery.render_gallery(
        [gallery.GalleryRow("q", Image.new("RGBA", (8, 8)), many)], path, thumb=24, max_results=2
    )
    image = Image.open(path)
    layout = gallery.GalleryLayout(24, 2, has_title=False)
    assert image.size == layout.size(1)
    assert layout.frame_box(0, 2)[2] + gallery.GAP == image.size[0]  # last column is the edge
    with pytest.raises(ValueError, match="at least one"):
        gallery.render_gallery([], path)


PREDICTIONS = {
    "good": ["a", "b", "x"],  # AP 1
    "half": ["x", "a", "y"],  # AP 0.25
    "bad": ["x", "y"],  # AP 0
    "bad2": ["y", "x"],  # AP 0
    "mid": ["a", "x", "b"],  # AP (1 + 2/3) / 2
    "no_gt": ["a"],  # empty ground truth: skipped
    "empty": [],  # no prediction: skipped
}
SOLUTION = {
    "good": ["a", "b"],
    "half": ["a", "b"],
    "bad": ["a"],
    "bad2": ["a"],
    "mid": ["a", "b"],
    "no_gt": [],
    "empty": ["a"],
    "missing": ["a"],  # no prediction: skipped
}


def test_choose_gallery_queries_is_a_deterministic_spread():
    chosen = gallery.choose_gallery_queries(PREDICTIONS, SOLUTION, num=3, seed=0)
    assert chosen == gallery.choose_gallery_queries(PREDICTIONS, SOLUTION, num=3, seed=0)
    assert len(chosen) == 3 and chosen[0] == "good" and chosen[1] == "half"
    assert chosen[2] in ("bad", "bad2")  # the worst, a tie broken by the seed
    worst = {gallery.choose_gallery_queries(PREDICTIONS, SOLUTION, 3, seed=s)[2] for s in range(8)}
    assert worst == {"bad", "bad2"}

    everything = gallery.choose_gallery_queries(PREDICTIONS, SOLUTION, num=20)
    assert everything[:3] == ["good", "mid", "half"]
    assert set(everything) == {"good", "mid", "half", "bad", "bad2"}
    assert gallery.choose_gallery_queries(PREDICTIONS, SOLUTION, num=0) == []
    assert gallery.choose_gallery_queries({}, SOLUTION) == []


def test_write_gallery_end_to_end(data_dir, tmp_path):
    predictions = {
        "q_gray": ["idx_red", "idx_green", "idx_blue", "idx_cyan"],
        "q_orange": ["idx_yellow", "idx_purple"],
    }
    solution = {"q_gray": ["idx_green"], "q_orange": ["idx_purple", "idx_cyan"]}
    path = str(tmp_path / "gallery.png")
    shown = gallery.write_gallery(
        data_dir, predictions, solution, path, max_results=3, thumb=48, title="mAP@100 0.5"
    )
    assert shown == ["q_gray", "q_orange"]  # AP 0.5, then AP 0.25
    image = Image.open(path)
    layout = gallery.GalleryLayout(48, 3, has_title=True)
    assert image.size == layout.size(2)
    canvas = np.asarray(image)
    assert (_frame_pixels(canvas, layout.frame_box(0, 1)) == gallery.WRONG_COLOR).all()
    assert (_frame_pixels(canvas, layout.frame_box(0, 2)) == gallery.CORRECT_COLOR).all()
    assert (_frame_pixels(canvas, layout.frame_box(1, 2)) == gallery.CORRECT_COLOR).all()
    assert (_frame_pixels(canvas, layout.frame_box(0, 3)) == gallery.WRONG_COLOR).all()
    left, top, right, bottom = layout.frame_box(1, 3)  # q_orange shows only 2 results
    assert (canvas[top:bottom, left:right] == gallery.BACKGROUND).all()
    with pytest.raises(KeyError, match="idx_gone"):
        gallery.write_gallery(data_dir, {"q_gray": ["idx_gone"]}, solution, path)
