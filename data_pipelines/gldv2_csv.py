"""Readers for the GLDv2 CSV files, strict about what they accept.

The GLDv2 release describes each split with a CSV: train.csv
(`id,url,landmark_id`), train_clean.csv (`landmark_id,images`, the images a
space-separated list of ids), and index.csv / test.csv (`id`, sometimes with
more columns). These readers check the header, the ids and the landmark ids,
and raise a `GLDv2FormatError` naming the file, the line and the value for
anything that does not fit, because a silently skipped row becomes a silently
missing image in training.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import re
from collections.abc import Iterator, Mapping, Sequence

from landmark_jax.runtime import file_io

_ID_PATTERN = re.compile(r"^[0-9a-zA-Z_-]+$")
# The builds store landmark ids as int64 (TFDS's tf.int64 feature): a larger
# id would fail deep in TFDS's encoder, naming neither the file nor the line.
LANDMARK_ID_RANGE = (-(2**63), 2**63 - 1)


class GLDv2FormatError(ValueError):
    """A GLDv2 CSV file does not have the expected format."""


@dataclasses.dataclass(frozen=True)
class ImageRecord:
    """One image of a split: its id and, for train, its landmark id."""

    image_id: str
    landmark_id: int | None = None
    line: int = 0  # the CSV line it came from (1 is the header), for messages


def _rows(path: str, required: Sequence[str]) -> Iterator[tuple[int, dict[str, str]]]:
    """Yields (line number, row) for a CSV after checking its header."""
    if not file_io.isfile(path):
        raise GLDv2FormatError(f"{path}: file not found")
    # newline="": the csv module sees the line endings as written, as with open().
    with io.StringIO(file_io.read_text(path), newline="") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames or []
        missing = [c for c in required if c not in header]
        if missing:
            raise GLDv2FormatError(
                f"{path}: missing column(s) {missing}; the header is {header}, "
                f"expected at least {list(required)}"
            )
        for row in reader:
            # DictReader puts surplus fields under the key None.
            if None in row:
                raise GLDv2FormatError(
                    f"{path}:{reader.line_num}: more fields than the header has: {row[None]}"
                )
            yield reader.line_num, row


def _check_id(path: str, line: int, image_id: str) -> str:
    image_id = image_id.strip()
    # The image tree nests ids by their first three characters (a/b/c/<id>.jpg).
    if len(image_id) < 3 or not _ID_PATTERN.match(image_id):
        raise GLDv2FormatError(
            f"{path}:{line}: invalid image id {image_id!r} (expected 3 or more of [0-9a-zA-Z_-])"
        )
    return image_id


def _parse_landmark_id(path: str, line: int, value: str | None) -> int:
    value = (value or "").strip()
    try:
        landmark_id = int(value)
    except ValueError:
        raise GLDv2FormatError(f"{path}:{line}: landmark_id {value!r} is not an integer") from None
    low, high = LANDMARK_ID_RANGE
    if not low <= landmark_id <= high:
        raise GLDv2FormatError(
            f"{path}:{line}: landmark_id {value} is out of range: the build stores landmark "
            f"ids as 64-bit integers ({low} to {high})"
        )
    return landmark_id


def _check_unique(path: str, records: Sequence[ImageRecord]) -> None:
    seen: dict[str, int] = {}
    duplicates: list[str] = []
    for r in records:
        if r.image_id in seen:
            duplicates.append(f"{r.image_id} (lines {seen[r.image_id]} and {r.line})")
        seen.setdefault(r.image_id, r.line)
    if duplicates:
        raise GLDv2FormatError(
            f"{path}: {len(duplicates)} duplicate image id(s), e.g. {duplicates[:5]}"
        )


def check_disjoint(listed: Mapping[str, Sequence[ImageRecord]]) -> None:
    """Refuses an image id that two split CSVs list (train, index, test...).

    An image in two splits is a test image seen in training, or a query that
    retrieves itself from the index: scores that look better than they are.

    Args:
      listed: each CSV's path -> its records (with their lines).

    Raises:
      GLDv2FormatError: an id in two CSVs, naming both files and lines, with
        the count of shared ids.
    """
    first: dict[str, tuple[str, int]] = {}
    shared: list[str] = []
    for path, records in listed.items():
        for r in records:
            if r.image_id in first:
                other, other_line = first[r.image_id]
                shared.append(f"{r.image_id} at {other}:{other_line} and {path}:{r.line}")
            else:
                first[r.image_id] = (path, r.line)
    if shared:
        raise GLDv2FormatError(
            f"{len(shared)} image id(s) listed in two splits, e.g. {'; '.join(shared[:3])}: "
            "an image belongs to one split (train, index, test or nonlandmark); remove it "
            "from all but one of those CSVs"
        )


def read_train_csv(path: str) -> list[ImageRecord]:
    """Reads train.csv (`id,url,landmark_id`).

    Args:
      path: the CSV file.

    Returns:
      One record per row, in file order, with its landmark id.

    Raises:
      GLDv2FormatError: missing file or columns, an invalid id, a landmark id
        that is not an integer, or a duplicate id.
    """
    records = [
        ImageRecord(
            _check_id(path, line, row["id"]),
            _parse_landmark_id(path, line, row["landmark_id"]),
            line,
        )
        for line, row in _rows(path, ("id", "landmark_id"))
    ]
    if not records:
        raise GLDv2FormatError(f"{path}: no rows")
    _check_unique(path, records)
    return records


def read_id_csv(path: str) -> list[ImageRecord]:
    """Reads index.csv or test.csv (an `id` column; other columns are ignored).

    Args:
      path: the CSV file.

    Returns:
      One record per row, in file order, without landmark ids.

    Raises:
      GLDv2FormatError: missing file or `id` column, an invalid or duplicate
        id, or an empty file.
    """
    records = [
        ImageRecord(_check_id(path, line, row["id"]), line=line)
        for line, row in _rows(path, ("id",))
    ]
    if not records:
        raise GLDv2FormatError(f"{path}: no rows")
    _check_unique(path, records)
    return records


def read_train_clean_csv(path: str) -> dict[str, int]:
    """Reads train_clean.csv (`landmark_id,images`).

    Args:
      path: the CSV file.

    Returns:
      A map from each clean image id to its landmark id.

    Raises:
      GLDv2FormatError: missing file or columns, a bad landmark id or image
        id, a landmark listed twice, or an image listed under two landmarks.
    """
    clean: dict[str, int] = {}
    landmarks: set[int] = set()
    for line, row in _rows(path, ("landmark_id", "images")):
        landmark_id = _parse_landmark_id(path, line, row["landmark_id"])
        if landmark_id in landmarks:
            raise GLDv2FormatError(f"{path}:{line}: landmark_id {landmark_id} listed twice")
        landmarks.add(landmark_id)
        ids = (row["images"] or "").split()
        if not ids:
            raise GLDv2FormatError(f"{path}:{line}: landmark_id {landmark_id} has no images")
        for image_id in ids:
            image_id = _check_id(path, line, image_id)
            if image_id in clean:
                raise GLDv2FormatError(
                    f"{path}:{line}: image {image_id} listed under landmarks "
                    f"{clean[image_id]} and {landmark_id}"
                )
            clean[image_id] = landmark_id
    if not clean:
        raise GLDv2FormatError(f"{path}: no rows")
    return clean


def image_path_candidates(images_dir: str, image_id: str) -> list[str]:
    """The paths an image may have in the GLDv2 tree `a/b/c/<id>.<ext>`.

    GLDv2 stores JPEGs as `<id>.jpg`; `.jpeg` and `.png` are accepted too so
    that a tree assembled from other sources converts without renaming.
    """
    folder = file_io.join(images_dir, image_id[0], image_id[1], image_id[2])
    return [file_io.join(folder, f"{image_id}{ext}") for ext in (".jpg", ".jpeg", ".png")]


def list_images(images_dir: str) -> set[str]:
    """Every file of a GLDv2 tree `a/b/c/<file>`, listed once.

    One listing instead of a check per image: in a bucket that is a few
    thousand list requests for GLDv2's 4.1M train images, not millions.
    """
    return set(file_io.glob(file_io.join(images_dir, "*", "*", "*", "*")))


def find_image(images_dir: str, image_id: str, listed: set[str] | None = None) -> str | None:
    """Returns the path of an image in the GLDv2 tree, or None if absent.

    Args:
      images_dir: the tree's root.
      image_id: the image's id.
      listed: the tree's files (list_images); None checks the file system.
    """
    for candidate in image_path_candidates(images_dir, image_id):
        if candidate in listed if listed is not None else file_io.isfile(candidate):
            return candidate
    return None


def has_rows(path: str) -> bool:
    """True if the CSV exists and has a row below its header (make_demo_dataset
    writes a header-only nonlandmark.csv when asked for no such images)."""
    if not file_io.exists(path):
        return False
    return any(line.strip() for line in file_io.read_text(path).splitlines()[1:])


def required(raw: str, name: str) -> str:
    path = file_io.join(raw, name)
    if not file_io.exists(path):
        found = sorted(file_io.listdir(raw))[:10] if file_io.isdir(raw) else []
        raise FileNotFoundError(
            f"{path} not found: the manual dir must hold GLDv2's CSVs and image trees "
            f"(found {found})"
        )
    return path
