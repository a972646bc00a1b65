"""An image file as the 3-channel JPEG bytes a data set stores (run in worker
processes and Beam workers).

Kept apart from the builders so that workers import only this module, PIL,
the file layer and the stored feature names (`landmark_jax.data.data_format`).
Paths may be local or URLs (gs://): images are read through
`landmark_jax.runtime.file_io`.

EXIF orientation: a camera may store its pixels as the sensor read them and
record in the EXIF `Orientation` tag (values 1-8) how to turn them upright.
TF's JPEG decoding, which the input pipeline uses (and GLR2020's notebooks
used), ignores the tag; `cv2.imread`, which GLR2021's (Henkel's
data/ch_ds_1.py) and DOLG's readers use (datasets/commondataset.py,
evaler/infer.py), applies it; PIL's `Image.open(...).convert('RGB')`,
cirtorch's reader, does not. `encode_image(..., exif_orientation=True)`
applies it once, at build time, so that every later decoding sees the image
upright, as cv2 would have shown it.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageOps

from data_pipelines.landmark_examples import Example
from landmark_jax.data import data_format
from landmark_jax.runtime import file_io


class BadImageError(ValueError):
    """An image file that cannot be decoded."""


def _to_8_bit(image: Image.Image, path: str) -> Image.Image:
    """High-bit-depth grayscale (16-bit PNG/TIFF: PIL modes I;16*, I) as 8-bit 'L'.

    PIL's own convert('RGB') clips such values at 255, which turns a 16-bit
    image white; here 0..65535 maps onto 0..255 (divided by 257). Values
    outside 16 bits, and float images (mode F), have no known range: refused.
    """
    if not (image.mode.startswith("I") or image.mode == "F"):
        return image
    values = np.asarray(image, dtype=np.float64)
    if image.mode == "F" or values.min() < 0 or values.max() > 65535:
        raise BadImageError(
            f"{path}: a {image.mode!r} image with values in [{values.min():g}, "
            f"{values.max():g}], which has no known 8-bit scale; convert it to 8-bit first"
        )
    # An I;16 image is 16-bit by its format; an 'I' one only when its values
    # need more than 8 bits.
    if image.mode.startswith("I;16") or values.max() > 255:
        values = values / 257.0
    return Image.fromarray(np.clip(np.round(values), 0, 255).astype(np.uint8))  # mode L


# The EXIF tag that says how to turn the stored pixels upright (1: as stored).
_ORIENTATION_TAG = 0x0112
_ROTATED_ORIENTATIONS = range(2, 9)


def exif_orientation_of(image: Image.Image) -> int:
    """An opened image's EXIF orientation, 1 (as stored) when absent or invalid."""
    value = image.getexif().get(_ORIENTATION_TAG, 1)
    return value if value in _ROTATED_ORIENTATIONS else 1


def encode_image(path: str, jpeg_quality: int = 95, exif_orientation: bool = False) -> bytes:
    """Returns 3-channel JPEG bytes for an image file, checking it decodes.

    RGB JPEGs are returned byte for byte (no second lossy compression); other
    modes (grayscale, CMYK, palette, alpha) and formats (PNG, ...) are
    converted to RGB and encoded as JPEG, so the training pipeline always
    sees 3-channel JPEGs; 16-bit grayscale is scaled to 8 bits (_to_8_bit).

    Args:
      path: the image file.
      jpeg_quality: quality for re-encoded images.
      exif_orientation: turn an image whose EXIF orientation is 2-8 upright
        (flipped and/or rotated as the tag says, as cv2.imread does) and
        re-encode it (one more JPEG generation, at jpeg_quality, 4:4:4);
        an image without the tag, or with 1, is stored as without the
        option. False: the pixels as stored, what TF's decoder shows.

    Returns:
      JPEG bytes.

    Raises:
      BadImageError: the file is empty, truncated or not an image (the message
        names the path and PIL's reason).
    """
    data = file_io.read_bytes(path)
    try:
        image = Image.open(io.BytesIO(data))
        orientation = exif_orientation_of(image) if exif_orientation else 1
        if image.format == "JPEG" and image.mode == "RGB" and orientation == 1:
            # Decoding at 1/8 scale still entropy-decodes the whole file, so a
            # truncated or corrupt JPEG fails here, at a fraction of the cost.
            image.draft("RGB", (image.width // 8 + 1, image.height // 8 + 1))
            image.load()
            return data
        image.load()
        if orientation != 1:
            image = ImageOps.exif_transpose(image)
        image = _to_8_bit(image, path)
        if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
            # Composite on white rather than letting transparent pixels turn black.
            rgba = image.convert("RGBA")
            background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            image = Image.alpha_composite(background, rgba)
        out = io.BytesIO()
        # 4:4:4 chroma: the default 4:2:0 would blur colour detail a second time.
        image.convert("RGB").save(out, format="JPEG", quality=jpeg_quality, subsampling=0)
        return out.getvalue()
    except BadImageError:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise BadImageError(f"{path}: cannot decode image ({e})") from None


def example_features(
    example: Example, jpeg_quality: int, skip_bad_images: bool, exif_orientation: bool = False
):
    """One example's TFDS features, or why it was skipped.

    Args:
      example: the planned example.
      jpeg_quality: quality of re-encoded images.
      skip_bad_images: return the reason for an undecodable image instead of
        raising.
      exif_orientation: turn EXIF-oriented images upright (encode_image).

    Returns:
      (image_id, features dict or None, reason or None).

    Raises:
      BadImageError: an undecodable image, unless skip_bad_images.
    """
    try:
        encoded = encode_image(example.path, jpeg_quality, exif_orientation)
    except BadImageError as e:
        if not skip_bad_images:
            raise
        return example.image_id, None, str(e).split(": ", 1)[1]
    return (
        example.image_id,
        {
            data_format.IMAGE: encoded,
            data_format.ID: example.image_id,
            data_format.LABEL: example.label,
            data_format.LANDMARK_ID: example.landmark_id,
            data_format.IS_CLEAN: bool(example.is_clean),
        },
        None,
    )
