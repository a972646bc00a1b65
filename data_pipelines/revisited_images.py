"""A Revisited Oxford/Paris image as the JPEG bytes its build stores (run in worker processes).

Kept apart from the builder, like image_encoding, so that workers import
only this module, PIL and the file layer, not TensorFlow Datasets.

Database images, and the queries of the `*_full_queries` configs, are stored
as image_encoding.encode_image stores any image (RGB JPEGs byte for byte).
Queries are cropped to their ground-truth box `bbx` [x1, y1, x2, y2]: the
protocol is explicit that "only the cropped regions are to be used as
queries; never the full image" (Radenovic et al. 2018). Boxes are rounded to
whole pixels as PIL's `Image.crop` rounds them (the crop DELF and cirtorch
apply), then clamped to the image; the crop is encoded once, as a 4:4:4 JPEG.
"""

from __future__ import annotations

import dataclasses
import io
from collections.abc import Sequence

from PIL import Image

from data_pipelines import image_encoding
from landmark_jax.runtime import file_io

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


@dataclasses.dataclass(frozen=True)
class Task:
    """One image to store: its gnd name, file and, for a cropped query, box.

    `where` names the image in errors (the gnd file, query number and name).
    """

    name: str
    path: str
    bbx: tuple[float, ...] | None = None
    where: str = ""


def _decode(data: bytes, path: str) -> Image.Image:
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise image_encoding.BadImageError(f"{path}: cannot decode image ({e})") from None
    return image


def cropped_query(task: Task, jpeg_quality: int) -> tuple[bytes, tuple[int, ...]]:
    """A query's bbx crop as JPEG bytes, and the whole-pixel box it took.

    RGB and grayscale images (the published sets') are cropped from their own
    pixels; other modes (CMYK, palette, alpha, 16-bit) are first brought to
    RGB by image_encoding.encode_image, the conversion every stored image
    gets, at the cost of one more high-quality JPEG generation.

    Raises:
      image_encoding.BadImageError: the image cannot be decoded (names it).
      ValueError: the box is empty inside the image (names query and file).
    """
    image = _decode(file_io.read_bytes(task.path), task.path)
    if image.mode not in ("RGB", "L"):
        image = _decode(image_encoding.encode_image(task.path, jpeg_quality), task.path)
    box = crop_box(task.bbx, image.width, image.height, task.where)
    out = io.BytesIO()
    # 4:4:4 chroma, as encode_image: 4:2:0 would blur the crop's colour detail.
    image.crop(box).convert("RGB").save(out, format="JPEG", quality=jpeg_quality, subsampling=0)
    return out.getvalue(), box


def encode(task: Task, jpeg_quality: int) -> tuple[str, bytes, tuple[int, ...] | None]:
    """(name, JPEG bytes, crop box or None) of one image: cropped if it has a bbx.

    Raises:
      image_encoding.BadImageError: the image cannot be decoded (names it).
      ValueError: a query's box is empty inside its image.
    """
    if task.bbx is None:
        return task.name, image_encoding.encode_image(task.path, jpeg_quality), None
    jpeg, box = cropped_query(task, jpeg_quality)
    return task.name, jpeg, box
