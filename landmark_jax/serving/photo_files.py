"""The photos a search reads: listing folders, globs and bucket prefixes; reading and decoding.

A source is a folder (walked recursively), a glob (`photos/*.jpg`,
`gs://bucket/shots/*/*.png`), a gs:// prefix (a "folder" of a bucket) or a
single file. Every file a source lists is tried as an image: decoded by
content, as the input pipeline decodes training and evaluation images
(input_pipeline.decode_image: JPEG, PNG, GIF, BMP; grayscale made RGB), so
a photo's descriptor starts from the same pixels `evaluate` would see.

Nothing is dropped silently: a file that cannot be read, or is not an image,
comes back as a `Skipped` entry (path + reason) that the index records and
the programs print with a count. A source that lists no file at all is an
error naming it (tf.data's empty glob is the trap this guards against).

Photos of a TFDS split (`split_records`) come out in the same form, with
their labels, for a model that is not a trained run (a SavedModel).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
from collections.abc import Iterable, Iterator, Sequence

import numpy as np
import tensorflow as tf

from landmark_jax.data import data_format, input_pipeline
from landmark_jax.runtime import file_io

# Characters that make a source a glob rather than a path.
_GLOB_CHARS = "*?["
# No label: photos from files, and splits without landmark labels.
NO_LABEL = -1
# Files read at once, and how far ahead of the decoding.
READ_THREADS = 8
READ_WINDOW = 64


@dataclasses.dataclass(frozen=True)
class Skipped:
    """A listed file that is not in the index, and why (for index_info.json)."""

    path: str
    reason: str

    def as_json(self) -> dict[str, str]:
        return {"path": self.path, "reason": self.reason}


@dataclasses.dataclass(frozen=True)
class Photo:
    """One decoded photo.

    Attributes:
      id: a short name: the file's stem (a GLDv2 image's id), or the path
        where two listed files share a stem.
      path: where it was read from ('' for a TFDS record).
      image: uint8 [H, W, 3].
      label: the landmark id of a labelled TFDS split's image, else NO_LABEL.
    """

    id: str
    path: str
    image: np.ndarray
    label: int = NO_LABEL


def _is_glob(source: str) -> bool:
    return any(c in source for c in _GLOB_CHARS)


def _walk(folder: str) -> list[str]:
    """Every file below a folder (local or bucket), sorted, through the file layer.

    A glob per level rather than file_io.listdir, whose answers are cached
    for the process's lifetime (a folder searched twice must show new files).
    """
    files: list[str] = []
    pending = [folder.rstrip("/")]
    while pending:
        current = pending.pop()
        for entry in file_io.glob(file_io.join(current, "*")):
            (pending if file_io.isdir(entry) else files).append(entry.rstrip("/"))
    return sorted(files)


def list_photo_files(sources: Sequence[str]) -> list[str]:
    """The files a list of sources names, each once, in source order.

    Args:
      sources: folders, globs, gs:// prefixes or files; a comma inside one
        entry separates several.

    Returns:
      File paths, each source's sorted.

    Raises:
      ValueError: no sources, or a source that names no file (named).
      FileNotFoundError: a path that is neither a folder nor a file.
    """
    entries = [s.strip() for source in sources for s in str(source).split(",") if s.strip()]
    if not entries:
        raise ValueError("no photos given: pass --images=FOLDER|GLOB|gs://PREFIX")
    seen: set[str] = set()
    out: list[str] = []
    for source in entries:
        if _is_glob(source):
            files = []
            for path in file_io.glob(source):
                files.extend(_walk(path) if file_io.isdir(path) else [path])
        elif file_io.isdir(source):
            files = _walk(source)
        elif file_io.exists(source) or os.path.islink(source):
            files = [source]
        else:
            raise FileNotFoundError(f"{source}: no such file, folder or bucket prefix")
        if not files:
            raise ValueError(f"{source}: lists no files (an empty folder, or a glob with no match)")
        for path in files:
            if path not in seen:
                seen.add(path)
                out.append(path)
    return out


def photo_ids(paths: Sequence[str]) -> list[str]:
    """A short id per path: its stem, or the whole path where stems repeat.

    GLDv2's images are named <id>.jpg, so a folder in its layout gets the
    same ids as its TFDS build (what lets a search be compared with `evaluate`).
    """
    stems = [os.path.splitext(file_io.basename(p))[0] for p in paths]
    counts: dict[str, int] = {}
    for stem in stems:
        counts[stem] = counts.get(stem, 0) + 1
    return [stem if counts[stem] == 1 else path for stem, path in zip(stems, paths, strict=True)]


def decode_photo(data: bytes) -> np.ndarray:
    """Image bytes -> uint8 [H, W, 3], as the input pipeline decodes them.

    Raises:
      ValueError: the bytes are not an image TensorFlow decodes, or an empty one.
    """
    try:
        image = input_pipeline.decode_image(tf.constant(data)).numpy()
    except (tf.errors.InvalidArgumentError, tf.errors.UnknownError) as e:
        first_line = (e.message or str(e)).strip().splitlines()[0]
        raise ValueError(f"not an image TensorFlow decodes ({first_line})") from e
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"an empty image ({image.shape[0]}x{image.shape[1]})")
    return image


def _read(path: str) -> tuple[bytes | None, str | None]:
    try:
        return file_io.read_bytes(path), None
    except OSError as e:
        return None, f"unreadable: {e}"


def read_photos(
    paths: Sequence[str], ids: Sequence[str] | None = None
) -> Iterator[Photo | Skipped]:
    """Each path read and decoded, in order: a Photo, or why it was skipped.

    Files are read READ_THREADS at a time (a bucket's latency, not its
    bandwidth, bounds one reader), a window of READ_WINDOW ahead; decoding
    stays in this thread, so at most a window of encoded photos is held.

    Args:
      paths: files (list_photo_files).
      ids: their ids (default photo_ids(paths)).

    Yields:
      A Photo per decodable file, a Skipped per unreadable or non-image one.
    """
    ids = photo_ids(paths) if ids is None else list(ids)
    with concurrent.futures.ThreadPoolExecutor(READ_THREADS) as pool:
        for start in range(0, len(paths), READ_WINDOW):
            window = list(paths[start : start + READ_WINDOW])
            for image_id, path, (data, error) in zip(
                ids[start : start + READ_WINDOW], window, pool.map(_read, window), strict=True
            ):
                if error is not None:
                    yield Skipped(path, error)
                    continue
                try:
                    yield Photo(image_id, path, decode_photo(data))
                except ValueError as e:
                    yield Skipped(path, str(e))


def split_records(data_dir: str, split: str) -> Iterator[Photo]:
    """A TFDS split's images in file order, decoded, with landmark ids as labels.

    Args:
      data_dir: the build.
      split: the split to read.

    Yields:
      Photos (path ''), label the landmark id of a labelled split's image.
    """
    info = data_format.read_split_info(data_dir, split)
    landmarks = data_format.read_label_map(data_dir).landmark_ids if info.labeled else None
    spec = input_pipeline.eval_feature_spec(info)
    records = tf.data.TFRecordDataset(list(info.files)).map(
        input_pipeline.graph_function(lambda r: tf.io.parse_single_example(r, spec))
    )
    for example in records.as_numpy_iterator():
        label = NO_LABEL
        if landmarks is not None:
            label = int(landmarks[int(example[data_format.LABEL])])
        image = decode_photo(example[data_format.IMAGE])
        yield Photo(example[data_format.ID].decode(), "", image, label)


def count_skipped(items: Iterable[Skipped]) -> str:
    """'N files skipped' with each path and reason on its own line."""
    items = list(items)
    lines = [f"{len(items)} file(s) skipped (not images, or unreadable):"]
    lines += [f"  {s.path}: {s.reason}" for s in items]
    return "\n".join(lines)
