r"""Converts Revisited Oxford/Paris (ROxford5k, RParis6k) into sharded TFRecords.

    python -m data_pipelines.revisited_to_tfrecord --gnd=gnd_roxford5k.pkl \
        --images_dir=roxford5k/jpg --output_dir=OUT [--num_shards=4] \
        [--no_crop_queries]

Writes two splits next to any others in OUT:

- `revisited_db`: the database images (`imlist`), in gnd order;
- `revisited_query`: the query images (`qimlist`), in gnd order, each cropped
  to its ground-truth box `bbx` [x1, y1, x2, y2]. The protocol is explicit:
  "only the cropped regions are to be used as queries; never the full image"
  (Radenovic et al. 2018). --no_crop_queries keeps the full images, only to
  reproduce papers that did so.

`image/id` is the image name (no extension); images are read from
`<images_dir>/<name>.jpg`. Shards are `<split>-0000i-of-0000N.tfrecord` in
contiguous blocks, so reading them in order gives gnd order. The splits are
merged into `dataset_info.json` (other splits are kept), and the gnd pickle is
copied to `OUT/gnd.pkl`, where `landmark_jax.retrieval.revisited` finds it.

Boxes are rounded to whole pixels as PIL's `Image.crop` rounds them (the crop
DELF and cirtorch apply), then clamped to the image. A missing or undecodable
image, or a box that is empty after clamping, stops the run naming the file.

Every path may be local or a URL (gs://...): the files go through
`landmark_jax.file_io`.
"""

from __future__ import annotations

import io
import os
import time
import uuid
from collections.abc import Sequence
from typing import Any

from absl import app, flags
from PIL import Image

from data_pipelines import shard_writer, tfrecord_shard
from landmark_jax import data_format, entry_point_errors, file_io, tensorflow_setup

DB_SPLIT = "revisited_db"
QUERY_SPLIT = "revisited_query"
GND_FILE = "gnd.pkl"
IMAGE_EXT = ".jpg"


def image_path(images_dir: str, name: str) -> str:
    """The file of a gnd image name: `<images_dir>/<name>.jpg`."""
    return file_io.join(images_dir, name + IMAGE_EXT)


def crop_box(bbx: Sequence[float], width: int, height: int, where: str) -> tuple[int, ...]:
    """A gnd bbx as a whole-pixel PIL box inside a width x height image.

    Args:
      bbx: [x1, y1, x2, y2] in pixels (floats; x2, y2 exclusive, as PIL's crop).
      width: the image width.
      height: the image height.
      where: names the query and file in errors.

    Returns:
      (left, upper, right, lower) with 0 <= left < right <= width and
      0 <= upper < lower <= height.

    Raises:
      ValueError: the box is empty or lies outside the image.
    """
    # Python's round, as PIL's Image.crop applies it to float boxes.
    x1, y1, x2, y2 = (round(float(v)) for v in bbx)
    left, right = max(x1, 0), min(x2, width)
    upper, lower = max(y1, 0), min(y2, height)
    if right <= left or lower <= upper:
        raise ValueError(
            f"{where}: bbx {list(bbx)} is empty inside the {width}x{height} image "
            f"(after rounding and clamping: [{left}, {upper}, {right}, {lower}])"
        )
    return left, upper, right, lower


def _write_query_crop(path: str, bbx: Sequence[float], out_path: str, where: str) -> None:
    """Crops an image to its bbx and saves it losslessly (PNG) for the shard writer.

    PNG keeps the crop exact; tfrecord_shard.encode_image then encodes it once
    as a 4:4:4 JPEG, so the query is compressed only one more time.

    Raises:
      tfrecord_shard.BadImageError: the image cannot be decoded.
      ValueError: the box is empty inside the image.
    """
    try:
        image = Image.open(io.BytesIO(file_io.read_bytes(path)))
        image.load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise tfrecord_shard.BadImageError(f"{path}: cannot decode image ({e})") from None
    crop = image.crop(crop_box(bbx, image.width, image.height, where))
    if crop.mode not in ("RGB", "L", "RGBA", "LA", "P"):
        crop = crop.convert("RGB")  # CMYK and friends cannot be saved as PNG
    out = io.BytesIO()
    crop.save(out, format="PNG")
    file_io.write_bytes(out_path, out.getvalue())


def _check_names(gnd_path: str, key: str, names: Sequence[str], images_dir: str) -> None:
    """Every name is unique and has a file (before anything is written)."""
    seen: set[str] = set()
    for i, name in enumerate(names):
        if not isinstance(name, str) or not name:
            raise ValueError(f"{gnd_path}: {key}[{i}] is {name!r}, expected an image name")
        if name in seen:
            raise ValueError(f"{gnd_path}: {key} lists {name!r} twice")
        seen.add(name)
    missing = [n for n in names if not file_io.isfile(image_path(images_dir, n))]
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} image(s) of {key} in {gnd_path} have no file, e.g. "
            f"{image_path(images_dir, missing[0])}"
        )


def _plan(
    split: str, examples: Sequence[tfrecord_shard.Example], num_shards: int
) -> list[tuple[str, list[tfrecord_shard.Example]]]:
    # Contiguous blocks: the shards read in order give the examples in order.
    n = len(examples)
    bounds = [n * s // num_shards for s in range(num_shards + 1)]
    return [
        (data_format.shard_name(split, s, num_shards), list(examples[a:b]))
        for s, (a, b) in enumerate(zip(bounds[:-1], bounds[1:], strict=True))
    ]


def _example(name: str, path: str) -> tfrecord_shard.Example:
    # Unlabeled, like GLDv2 index/test: relevance lives in gnd.pkl, not in labels.
    return tfrecord_shard.Example(image_id=name, path=path, label=-1, landmark_id=-1, is_clean=1)


def build_revisited(
    gnd_path: str,
    images_dir: str,
    output_dir: str,
    num_shards: int = 4,
    crop_queries: bool = True,
    *,
    num_workers: int | None = None,
    jpeg_quality: int = 95,
) -> dict[str, Any]:
    """Writes the Revisited database and (cropped) queries as TFRecord splits.

    Args:
      gnd_path: gnd_roxford5k.pkl or gnd_rparis6k.pkl (imlist, qimlist, gnd).
      images_dir: folder with `<name>.jpg` for every imlist and qimlist name.
      output_dir: the data folder (may already hold other splits); local or a
        URL (gs://; ram:// with num_workers <= 1 only).
      num_shards: shard files for the database; the queries get
        min(num_shards, number of queries).
      crop_queries: crop each query to its bbx (the protocol); False keeps
        the full query images.
      num_workers: processes writing shards; default min(shards, cores) (1
        for a ram:// output_dir).
      jpeg_quality: quality of re-encoded images (every cropped query, and
        database images that are not RGB JPEGs).

    Returns:
      A summary: examples and files per split, whether queries were cropped,
      the gnd copy's path and the seconds taken.

    Raises:
      data_format.DataFormatError: the gnd pickle is missing or malformed.
      FileNotFoundError: images_dir is not a folder, or an image has no file.
      tfrecord_shard.BadImageError: an image cannot be decoded (names it).
      ValueError: num_shards < 1 or more than the database images, a
        repeated or empty image name, a bbx empty inside its image, or
        num_workers > 1 with a ram:// output_dir.
    """
    start = time.time()
    if num_shards < 1:
        raise ValueError(f"--num_shards={num_shards}: expected >= 1")
    shard_writer.check_num_workers(output_dir, num_workers)
    gnd = data_format.read_revisited_gnd(gnd_path)
    imlist, qimlist = gnd["imlist"], gnd["qimlist"]
    if not imlist or not qimlist:
        raise ValueError(
            f"{gnd_path}: {len(imlist)} database and {len(qimlist)} query images; need both"
        )
    if num_shards > len(imlist):
        raise ValueError(
            f"--num_shards={num_shards} is more than the {len(imlist)} database images "
            f"of {gnd_path}"
        )
    if not file_io.isdir(images_dir):
        raise FileNotFoundError(f"--images_dir={images_dir}: not a directory")
    _check_names(gnd_path, "imlist", imlist, images_dir)
    _check_names(gnd_path, "qimlist", qimlist, images_dir)

    file_io.makedirs(output_dir)
    db_examples = [_example(n, image_path(images_dir, n)) for n in imlist]
    # Crops go to a scratch folder inside output_dir, so the writer processes
    # read them like any image and nothing is left behind on success or error.
    scratch = file_io.join(output_dir, f".revisited-crops-{uuid.uuid4().hex[:8]}")
    file_io.makedirs(scratch)
    try:
        query_examples = []
        for q, name in enumerate(qimlist):
            path = image_path(images_dir, name)
            if crop_queries:
                cropped = file_io.join(scratch, f"{q:06d}.png")
                where = f"{gnd_path}: query {q} ({name!r}, {path})"
                _write_query_crop(path, gnd["gnd"][q]["bbx"], cropped, where)
                path = cropped
            query_examples.append(_example(name, path))

        plan = _plan(DB_SPLIT, db_examples, num_shards)
        plan += _plan(QUERY_SPLIT, query_examples, min(num_shards, len(qimlist)))
        if num_workers is None:
            num_workers = shard_writer.default_num_workers(
                output_dir, min(len(plan), os.cpu_count() or 1)
            )
        # Written aside; the old splits are replaced only once the new ones are complete.
        with shard_writer.StagedBuild(output_dir, "revisited") as staged:
            results = shard_writer.write_shards(staged.path, plan, False, num_workers, jpeg_quality)
            info_splits: dict[str, dict] = {}
            for r in results:
                name = file_io.basename(r.path)
                split = DB_SPLIT if name.startswith(DB_SPLIT + "-") else QUERY_SPLIT
                entry = info_splits.setdefault(
                    split, {"num_examples": 0, "num_clean": 0, "files": []}
                )
                entry["num_examples"] += r.num_examples
                entry["num_clean"] += r.num_clean
                entry["files"].append(
                    {"name": name, "num_examples": r.num_examples, "sha256": r.sha256}
                )
            gnd_copy = file_io.join(output_dir, GND_FILE)
            # Read before the swap: gnd_path may be the copy itself.
            file_io.write_bytes(file_io.join(staged.path, GND_FILE), file_io.read_bytes(gnd_path))
            source = {
                "gnd": shard_writer.source_path(gnd_path),
                "images_dir": shard_writer.source_path(images_dir),
                "crop_queries": crop_queries,
            }
            staged.commit((DB_SPLIT, QUERY_SPLIT), info_splits, None, source)
    finally:
        file_io.rmtree(scratch)

    return {
        "gnd": gnd_path,
        "output_dir": output_dir,
        "gnd_copy": gnd_copy,
        "crop_queries": crop_queries,
        "splits": {
            k: {"num_examples": v["num_examples"], "num_files": len(v["files"])}
            for k, v in info_splits.items()
        },
        "seconds": round(time.time() - start, 1),
    }


def format_summary(summary: dict[str, Any]) -> str:
    """Renders build_revisited's summary for the console."""
    lines = [f"Revisited {summary['gnd']} -> {summary['output_dir']} ({summary['seconds']} s)"]
    for name, s in summary["splits"].items():
        lines.append(f"  {name:15s}: {s['num_examples']:>6,d} images in {s['num_files']} files")
    lines.append(
        "  queries cropped to their bbx"
        if summary["crop_queries"]
        else "  queries NOT cropped (--no_crop_queries; not the standard protocol)"
    )
    lines.append(f"  ground truth: {summary['gnd_copy']}")
    return "\n".join(lines)


FLAGS = flags.FLAGS


def define_flags() -> None:
    """Defines the command-line flags (only when run as a program: absl flags are
    global, and importing two tools into one process must not collide)."""
    flags.DEFINE_string("gnd", None, "gnd_roxford5k.pkl or gnd_rparis6k.pkl.")
    flags.DEFINE_string("images_dir", None, "Folder with <name>.jpg for every gnd image.")
    flags.DEFINE_string("output_dir", None, "Data folder for the shards and dataset_info.json.")
    flags.DEFINE_integer("num_shards", 4, "Shard files for the database split.")
    # Named for how it is used: absl spells the negation of a bool flag --nofoo,
    # and the protocol's default (cropping) should need no flag at all.
    flags.DEFINE_bool(
        "no_crop_queries",
        False,
        "Keep the full query images instead of their bbx crops (not the standard protocol).",
    )
    flags.DEFINE_integer("num_workers", None, "Writer processes (default: min(shards, cores)).")
    flags.DEFINE_integer("jpeg_quality", 95, "JPEG quality for re-encoded images.")


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    tensorflow_setup.hide_accelerators()
    summary = build_revisited(
        FLAGS.gnd,
        FLAGS.images_dir,
        FLAGS.output_dir,
        FLAGS.num_shards,
        not FLAGS.no_crop_queries,
        num_workers=FLAGS.num_workers,
        jpeg_quality=FLAGS.jpeg_quality,
    )
    print(format_summary(summary))


if __name__ == "__main__":
    define_flags()
    flags.mark_flags_as_required(["gnd", "images_dir", "output_dir"])
    entry_point_errors.run(main)
