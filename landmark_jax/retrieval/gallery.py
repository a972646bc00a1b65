"""A picture of what the model retrieves: `eval/gallery.png`.

One row per sample query: the query image in a blue frame, then its top
retrieved index images in rank order, each framed green (in the ground truth),
red (not in it) or gray (no ground truth to judge by). Numbers say how well a
model does; the gallery says how it fails (near duplicates of the wrong
building, a strong bias towards one landmark, text or faces matched instead of
architecture), which is what one wants to see after an evaluation.

Three steps, kept apart so each can be tested and reused:

- `choose_gallery_queries` picks a deterministic spread of queries, from the
  best to the worst average precision;
- `read_images_by_id` pulls just those images out of a split's TFRecords
  (`thumbnail` shrinks each; `python -m landmark_jax.search` draws its
  galleries of photo files with it and `render_gallery`);
- `render_gallery` draws the grid with PIL only (default font, no font files);
- `write_gallery` chains the three, as evaluation calls it.

Layout (all in pixels, see `GalleryLayout`): a header with an optional title
and a colour legend, then one row per query. Every cell is a `thumb` x `thumb`
letterboxed image inside a FRAME-wide coloured frame, with two lines of text
under it; the query column is set apart from the results by QUERY_GAP.
"""

from __future__ import annotations

import dataclasses
import io
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import tensorflow as tf
from PIL import Image, ImageDraw, ImageFont, ImageOps

from landmark_jax.data import data_format, input_pipeline
from landmark_jax.retrieval import metrics
from landmark_jax.runtime import file_io

# Frame colours. Green and red differ in both the R and G channels (not only
# in hue), and the text under each result repeats the verdict for readers
# who cannot tell them apart.
QUERY_COLOR = (40, 90, 220)
CORRECT_COLOR = (30, 170, 60)
WRONG_COLOR = (215, 35, 35)
UNKNOWN_COLOR = (150, 150, 150)
BACKGROUND = (255, 255, 255)
LETTERBOX = (232, 232, 232)  # the bars around a non-square thumbnail
TEXT_COLOR = (20, 20, 20)

FRAME = 4  # frame width around each thumbnail
GAP = 6  # space between cells and around the grid
QUERY_GAP = 14  # extra space between the query and its results
LINE_HEIGHT = 13  # one line of PIL's default font (10 px) plus leading
LABEL_LINES = 2
SHORT_ID = 12  # characters of an id shown under a thumbnail


@dataclasses.dataclass(frozen=True)
class GalleryRow:
    """One query and its ranked results.

    Attributes:
      query_id: the query (test) image id.
      query_image: the query image, any size or mode.
      results: (index id, image, correct) best first; correct is True/False,
        or None where there is no ground truth to judge by.
      caption: a short note shown under the query, e.g. "AP 0.42".
    """

    query_id: str
    query_image: Image.Image
    results: Sequence[tuple[str, Image.Image, bool | None]]
    caption: str | None = None


@dataclasses.dataclass(frozen=True)
class GalleryLayout:
    """Where things go in the gallery image; shared by the renderer and tests.

    Column 0 is the query, columns 1..max_results its results in rank order.
    """

    thumb: int = 96
    max_results: int = 8
    has_title: bool = False

    @property
    def cell(self) -> int:
        """Side of a framed thumbnail."""
        return self.thumb + 2 * FRAME

    @property
    def header_height(self) -> int:
        # The legend line always; the title line above it when there is one.
        return GAP + LINE_HEIGHT * (2 if self.has_title else 1)

    @property
    def row_height(self) -> int:
        return GAP + self.cell + LABEL_LINES * LINE_HEIGHT

    def size(self, num_rows: int) -> tuple[int, int]:
        """(width, height) of a gallery with `num_rows` queries."""
        width = GAP + (1 + self.max_results) * (self.cell + GAP) + QUERY_GAP
        height = self.header_height + num_rows * self.row_height + GAP
        return width, height

    def frame_box(self, row: int, col: int) -> tuple[int, int, int, int]:
        """(left, top, right, bottom), exclusive, of the framed cell at row, col."""
        left = GAP + col * (self.cell + GAP) + (QUERY_GAP if col > 0 else 0)
        top = self.header_height + GAP + row * self.row_height
        return left, top, left + self.cell, top + self.cell

    def thumb_box(self, row: int, col: int) -> tuple[int, int, int, int]:
        """(left, top, right, bottom), exclusive, of the image inside the frame."""
        left, top, right, bottom = self.frame_box(row, col)
        return left + FRAME, top + FRAME, right - FRAME, bottom - FRAME


def read_images_by_id(
    data_dir: str, split: str, ids: Iterable[str], max_side: int = 128
) -> dict[str, Image.Image]:
    """Reads a few images of a split by id, as RGB thumbnails.

    The split's shards are scanned (several at once); each record's id is
    parsed first and only the wanted records have their JPEG decoded, so a
    handful of images out of a 762k-image index costs one pass of reading and
    parsing, not 762k decodes. The scan stops as soon as every id is found;
    results near the end of the last shards still need most of the split read,
    which on GLDv2 is tens of GB, so ask for all the ids at once.

    Args:
      data_dir: the data set (a TFDS build).
      split: the split holding the images, e.g. 'index' or 'test'.
      ids: image ids to read; duplicates are read once.
      max_side: the longer side of the returned thumbnails (never upscaled).

    Returns:
      id -> RGB image, for every requested id.

    Raises:
      KeyError: some ids are not in the split (the message names them).
      data_format.DataFormatError: the split's files are missing or stale.
    """
    wanted = sorted(set(ids))
    if not wanted:
        return {}
    info = data_format.read_split_info(data_dir, split)
    table = tf.lookup.StaticHashTable(
        tf.lookup.KeyValueTensorInitializer(tf.constant(wanted), tf.ones([len(wanted)], tf.int32)),
        default_value=0,
    )
    id_spec = {data_format.ID: tf.io.FixedLenFeature([], tf.string)}
    both_spec = {**id_spec, data_format.IMAGE: tf.io.FixedLenFeature([], tf.string)}

    @input_pipeline.graph_function
    def keep_wanted(records):
        # Vectorised over a batch: parse_example on 1024 records is far faster
        # than 1024 parse_single_example calls, and parsing is the scan's cost.
        image_ids = tf.io.parse_example(records, id_spec)[data_format.ID]
        return tf.boolean_mask(records, table.lookup(image_ids) > 0)

    @input_pipeline.graph_function
    def parse(record):
        ex = tf.io.parse_single_example(record, both_spec)
        return ex[data_format.ID], ex[data_format.IMAGE]

    ds = (
        tf.data.TFRecordDataset(list(info.files), num_parallel_reads=min(8, len(info.files)))
        .batch(1024)
        .map(keep_wanted, num_parallel_calls=tf.data.AUTOTUNE)
        .unbatch()
        .map(parse)
    )
    found: dict[str, Image.Image] = {}
    for raw_id, encoded in ds.as_numpy_iterator():
        image_id = raw_id.decode()
        if image_id in found:
            continue  # an id repeated in the split: keep the first one read
        found[image_id] = thumbnail(encoded, max_side)
        if len(found) == len(wanted):
            break
    missing = [i for i in wanted if i not in found]
    if missing:
        raise KeyError(
            f"{len(missing)} id(s) not in the {split!r} split of {data_dir}: "
            f"{missing[:10]}{' ...' if len(missing) > 10 else ''}"
        )
    return found


def thumbnail(encoded: bytes, max_side: int = 128) -> Image.Image:
    """Encoded image bytes as an RGB thumbnail, longer side at most max_side.

    Raises:
      PIL.UnidentifiedImageError: the bytes are not an image PIL reads.
    """
    image = Image.open(io.BytesIO(encoded))
    # draft() lets the JPEG decoder downscale by 2-8x while decoding,
    # much cheaper than decoding a full-size photo and then shrinking it.
    image.draft("RGB", (max_side, max_side))
    image = image.convert("RGB")
    image.thumbnail((max_side, max_side))
    return image


def _fit(draw: ImageDraw.ImageDraw, font, text: str, width: int) -> str:
    """`text`, cut with '..' so it fits in `width` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "..", font=font) > width:
        text = text[:-1]
    return text + ".."


def _short(image_id: str) -> str:
    return image_id[:SHORT_ID]


def _draw_cell(
    canvas: Image.Image,
    draw: ImageDraw.ImageDraw,
    font,
    layout: GalleryLayout,
    row: int,
    col: int,
    image: Image.Image,
    color: tuple[int, int, int],
    lines: Sequence[str],
) -> None:
    left, top, right, bottom = layout.frame_box(row, col)
    draw.rectangle((left, top, right - 1, bottom - 1), fill=color)
    tl, tt, tr, tb = layout.thumb_box(row, col)
    draw.rectangle((tl, tt, tr - 1, tb - 1), fill=LETTERBOX)
    # contain() scales up as well as down, so small images fill the cell too.
    fitted = ImageOps.contain(image.convert("RGB"), (layout.thumb, layout.thumb))
    canvas.paste(
        fitted,
        (tl + (layout.thumb - fitted.width) // 2, tt + (layout.thumb - fitted.height) // 2),
    )
    for i, line in enumerate(lines[:LABEL_LINES]):
        draw.text(
            (left, bottom + 1 + i * LINE_HEIGHT),
            _fit(draw, font, line, layout.cell),
            fill=TEXT_COLOR,
            font=font,
        )


def _draw_header(draw: ImageDraw.ImageDraw, font, layout: GalleryLayout, title: str | None):
    width, _ = layout.size(0)
    y = GAP
    if title:
        draw.text((GAP, y), _fit(draw, font, title, width - 2 * GAP), fill=TEXT_COLOR, font=font)
        y += LINE_HEIGHT
    x = GAP
    swatch = LINE_HEIGHT - 4
    for name, color in (
        ("query", QUERY_COLOR),
        ("correct", CORRECT_COLOR),
        ("wrong", WRONG_COLOR),
        ("unknown", UNKNOWN_COLOR),
    ):
        if x + swatch + draw.textlength(name, font=font) > width - GAP:
            break  # a very narrow gallery: leave the rest of the legend out
        draw.rectangle((x, y + 2, x + swatch - 1, y + 1 + swatch), fill=color)
        x += swatch + 3
        draw.text((x, y), name, fill=TEXT_COLOR, font=font)
        x += int(draw.textlength(name, font=font)) + 10


def render_gallery(
    rows: Sequence[GalleryRow],
    path: str,
    *,
    thumb: int = 96,
    max_results: int = 8,
    title: str | None = None,
) -> None:
    """Draws queries and their top results as a PNG grid.

    The image is `GalleryLayout(thumb, max_results, bool(title)).size(len(rows))`
    whatever the number of results per row: rows with fewer results leave
    their last cells empty, rows with more show the first `max_results`.

    Args:
      rows: the queries, top to bottom.
      path: where to write the PNG (local or gs://);
        parent folders are created.
      thumb: side of each thumbnail in pixels; images are letterboxed into it.
      max_results: result columns after the query column.
      title: a line above the grid, e.g. the model and its mAP@100.

    Raises:
      ValueError: no rows, or thumb / max_results below 1.
    """
    if not rows:
        raise ValueError("render_gallery needs at least one query row")
    if thumb < 1 or max_results < 1:
        raise ValueError(f"thumb and max_results must be >= 1, got {thumb}, {max_results}")
    layout = GalleryLayout(thumb, max_results, bool(title))
    canvas = Image.new("RGB", layout.size(len(rows)), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    _draw_header(draw, font, layout, title)
    for r, row in enumerate(rows):
        query_lines = [f"query {_short(row.query_id)}", row.caption or ""]
        _draw_cell(canvas, draw, font, layout, r, 0, row.query_image, QUERY_COLOR, query_lines)
        for rank, (image_id, image, correct) in enumerate(row.results[:max_results], 1):
            color, verdict = {
                True: (CORRECT_COLOR, "ok"),
                False: (WRONG_COLOR, "wrong"),
                None: (UNKNOWN_COLOR, ""),
            }[correct]
            lines = [f"#{rank} {verdict}".rstrip(), _short(image_id)]
            _draw_cell(canvas, draw, font, layout, r, rank, image, color, lines)
    _write_png(canvas, path)


def _write_png(image: Image.Image, path: str) -> None:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    file_io.write_bytes(path, buffer.getvalue())


def choose_gallery_queries(
    predictions: Mapping[str, Sequence[str]],
    solution: Mapping[str, Sequence[str]],
    num: int = 8,
    seed: int = 0,
) -> list[str]:
    """A deterministic spread of queries, from the best retrieved to the worst.

    Candidates are the solution's queries that have a non-empty prediction and
    a non-empty ground truth (a query with nothing to find shows only red and
    says nothing about the model). They are ordered by their AP@100 (the
    GLDv2 definition, `metrics.mean_average_precision` on the one query), best
    first, and `num` of them are taken at evenly spaced positions of that
    order, so the gallery shows successes, middling queries and failures in
    the proportions the model produces them. Ties in AP (typically many
    queries at 0 or 1) are broken by a shuffle seeded by `seed`, so the same
    inputs and seed always give the same queries.

    Args:
      predictions: query id -> retrieved index ids, best first.
      solution: query id -> relevant index ids.
      num: how many queries to return (fewer if there are fewer candidates).
      seed: picks among queries with equal AP.

    Returns:
      Query ids, best AP first.
    """
    candidates = sorted(q for q, gt in solution.items() if gt and predictions.get(q))
    if num <= 0 or not candidates:
        return []
    order = np.random.default_rng(seed).permutation(len(candidates))
    shuffled = [candidates[i] for i in order]
    ap = {
        q: metrics.mean_average_precision({q: predictions[q]}, {q: solution[q]}) for q in shuffled
    }
    # sorted() is stable, so the seeded shuffle decides among equal APs.
    ranked = sorted(shuffled, key=lambda q: -ap[q])
    if num >= len(ranked):
        return ranked
    positions = np.round(np.linspace(0, len(ranked) - 1, num)).astype(int)
    return [ranked[i] for i in positions]


def write_gallery(
    data_dir: str,
    predictions: Mapping[str, Sequence[str]],
    solution: Mapping[str, Sequence[str]],
    path: str,
    *,
    num_queries: int = 8,
    max_results: int = 8,
    thumb: int = 96,
    title: str | None = None,
    query_split: str = "test",
    index_split: str = "index",
    seed: int = 0,
) -> list[str]:
    """Chooses queries, reads their images and results, and renders the gallery.

    Args:
      data_dir: the data folder holding both splits.
      predictions: query id -> retrieved index ids, best first.
      solution: query id -> relevant index ids.
      path: the PNG to write, e.g. `<workdir>/eval/gallery.png`.
      num_queries: rows, chosen by `choose_gallery_queries`.
      max_results: results shown per query.
      thumb: thumbnail side in pixels.
      title: a line above the grid.
      query_split: the split holding the queries.
      index_split: the split holding the retrieved images.
      seed: passed to `choose_gallery_queries`.

    Returns:
      The query ids shown, top to bottom; empty (and nothing written) when no
      query has both a prediction and a ground truth.

    Raises:
      KeyError: a chosen query or retrieved id is not in its split.
    """
    queries = choose_gallery_queries(predictions, solution, num_queries, seed)
    if not queries:
        return []
    shown = {q: list(predictions[q])[:max_results] for q in queries}
    query_images = read_images_by_id(data_dir, query_split, queries, max_side=thumb)
    index_images = read_images_by_id(
        data_dir, index_split, {i for ids in shown.values() for i in ids}, max_side=thumb
    )
    rows = []
    for q in queries:
        relevant = set(solution[q])
        ap = metrics.mean_average_precision({q: predictions[q]}, {q: solution[q]})
        results = [(i, index_images[i], i in relevant) for i in shown[q]]
        rows.append(GalleryRow(q, query_images[q], results, caption=f"AP@100 {ap:.3f}"))
    render_gallery(rows, path, thumb=thumb, max_results=max_results, title=title)
    return queries
