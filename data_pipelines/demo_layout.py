"""The GLDv2 file layout of the demo data set: image paths and CSV files.

`make_demo_dataset` decides which images the data set has; this module decides
where they go and how they are listed, in the layout of the GLDv2 release:
images at `<split>/a/b/c/<id>.jpg` (`image_path`) and the CSV files
`CSV_FILES` (`write_csvs`): train.csv, train_clean.csv, index.csv, test.csv,
index_image_to_landmark.csv and the two solution files; and, beyond GLDv2,
nonlandmark.csv (ids, like index.csv) of the `nonlandmark/` images: known
non-landmark photographs, the reference set of recognition's non-landmark
penalty (landmark_jax.retrieval.recognition). `prepare_output_dir`
removes exactly these (and the split folders) before a data set is rewritten.
The folder may be local or a URL (gs://): files go through `landmark_jax.runtime.file_io`.

The solutions list every test id, as the GLDv2 v2.1 files do:
retrieval_solution.csv has `<index ids>,Public|Private` for queries and
`None,Ignored` for every other test image; recognition_solution.csv has
`<landmark_id>,Public|Private` for recognition images and an empty landmarks
field with Public/Private for the others, so that confident predictions on
them lower GAP (GAP counts them in its ranking; Ignored rows it would skip).
Each test image has one Usage, shared by both files.
"""

from __future__ import annotations

import collections
import csv
import io
from collections.abc import Sequence
from typing import Protocol

from landmark_jax.runtime import file_io

SPLITS = ("train", "index", "test", "nonlandmark")
CSV_FILES = (
    "train.csv",
    "train_clean.csv",
    "index.csv",
    "test.csv",
    "nonlandmark.csv",
    "index_image_to_landmark.csv",
    "retrieval_solution.csv",
    "recognition_solution.csv",
)


class LaidOutImage(Protocol):
    """What the CSV files need to know of one planned image."""

    split: str  # one of SPLITS
    image_id: str
    label: int | None  # train: the landmark id it is filed under
    clean: bool  # train: listed in train_clean.csv
    truth: int | None  # index and test: the landmark id shown; None for non-landmarks
    test_role: str | None  # test: "query", "recognition" or "distractor"
    usage: str  # test: "Public" or "Private"


def image_path(images_dir: str, image_id: str) -> str:
    """The GLDv2 path of an image: `<images_dir>/a/b/c/<id>.jpg`.

    Args:
      images_dir: the split's image folder, e.g. `<output_dir>/train`.
      image_id: the image id (at least 3 characters).

    Returns:
      The file path.
    """
    return file_io.join(images_dir, image_id[0], image_id[1], image_id[2], f"{image_id}.jpg")


def _write_csv(path: str, header: Sequence[str], rows) -> None:
    text = io.StringIO(newline="")
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    file_io.write_text(path, text.getvalue())


def write_csvs(output_dir: str, photos: Sequence[LaidOutImage]) -> None:
    """Writes the GLDv2 CSV files, rows sorted by id (or landmark id) for stable bytes."""
    by_split = {
        split: sorted((p for p in photos if p.split == split), key=lambda p: p.image_id)
        for split in SPLITS
    }
    join = file_io.join
    _write_csv(
        join(output_dir, "train.csv"),
        ("id", "url", "landmark_id"),
        ((p.image_id, f"demo://train/{p.image_id}.jpg", p.label) for p in by_split["train"]),
    )
    clean: dict[int, list[str]] = collections.defaultdict(list)
    for p in by_split["train"]:
        if p.clean:
            clean[p.label].append(p.image_id)
    _write_csv(
        join(output_dir, "train_clean.csv"),
        ("landmark_id", "images"),
        ((lm, " ".join(ids)) for lm, ids in sorted(clean.items())),
    )
    for split in ("index", "test", "nonlandmark"):
        _write_csv(
            join(output_dir, f"{split}.csv"), ("id",), ((p.image_id,) for p in by_split[split])
        )
    _write_csv(
        join(output_dir, "index_image_to_landmark.csv"),
        ("id", "landmark_id"),
        ((p.image_id, p.truth) for p in by_split["index"] if p.truth is not None),
    )
    index_of: dict[int, list[str]] = collections.defaultdict(list)
    for p in by_split["index"]:
        if p.truth is not None:
            index_of[p.truth].append(p.image_id)
    retrieval, recognition = [], []
    for p in by_split["test"]:
        if p.test_role == "query":
            retrieval.append((p.image_id, " ".join(index_of[p.truth]), p.usage))
        else:
            retrieval.append((p.image_id, "None", "Ignored"))
        landmarks = str(p.truth) if p.test_role == "recognition" else ""
        recognition.append((p.image_id, landmarks, p.usage))
    _write_csv(join(output_dir, "retrieval_solution.csv"), ("id", "images", "Usage"), retrieval)
    _write_csv(
        join(output_dir, "recognition_solution.csv"), ("id", "landmarks", "Usage"), recognition
    )


def prepare_output_dir(output_dir: str, overwrite: bool) -> None:
    """Creates the folder, refusing to mix with earlier contents unless told to."""
    if file_io.exists(output_dir) and not file_io.isdir(output_dir):
        raise NotADirectoryError(f"--output_dir {output_dir!r} exists and is not a folder")
    if file_io.isdir(output_dir) and file_io.listdir(output_dir):
        if not overwrite:
            raise FileExistsError(
                f"--output_dir {output_dir!r} is not empty; pass --overwrite to replace "
                "a data set there, or choose another folder"
            )
        # Remove only what this tool writes: the folder may hold other work.
        for split in SPLITS:
            folder = file_io.join(output_dir, split)
            if file_io.isdir(folder):
                file_io.rmtree(folder)
        for name in CSV_FILES:
            path = file_io.join(output_dir, name)
            if file_io.isfile(path):
                file_io.remove(path)
    file_io.makedirs(output_dir)
