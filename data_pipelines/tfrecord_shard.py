"""Writes one TFRecord shard of GLDv2 images (run inside a worker process).

Kept apart from the builder's planning so the worker processes import only
this module, PIL and TensorFlow's record writer. Paths may be local or URLs
(gs://): images are read through `landmark_jax.file_io`, and the shard is
written by TensorFlow's record writer, which takes the same paths.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import io
from collections.abc import Sequence

import numpy as np
from PIL import Image

from landmark_jax import data_format, file_io


class BadImageError(ValueError):
    """An image file that cannot be decoded."""


@dataclasses.dataclass(frozen=True)
class Example:
    """One image to write: id, file, contiguous label, landmark id, clean flag."""

    image_id: str
    path: str
    label: int
    landmark_id: int
    is_clean: int


@dataclasses.dataclass(frozen=True)
class ShardJob:
    path: str
    examples: Sequence[Example]
    skip_bad_images: bool
    jpeg_quality: int


@dataclasses.dataclass
class ShardResult:
    path: str
    num_examples: int = 0
    num_clean: int = 0
    label_counts: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    clean_label_counts: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    skipped: list[tuple[str, str, str]] = dataclasses.field(default_factory=list)
    # SHA-256 of the shard's records (each length-prefixed, in order): the
    # shard's identity, recorded in dataset_info.json.
    sha256: str = ""


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


def encode_image(path: str, jpeg_quality: int = 95) -> bytes:
    """Returns 3-channel JPEG bytes for an image file, checking it decodes.

    RGB JPEGs are returned byte for byte (no second lossy compression); other
    modes (grayscale, CMYK, palette, alpha) and formats (PNG, ...) are
    converted to RGB and encoded as JPEG, so the training pipeline always
    sees 3-channel JPEGs; 16-bit grayscale is scaled to 8 bits (_to_8_bit).

    Args:
      path: the image file.
      jpeg_quality: quality for re-encoded images.

    Returns:
      JPEG bytes.

    Raises:
      BadImageError: the file is empty, truncated or not an image (the message
        names the path and PIL's reason).
    """
    data = file_io.read_bytes(path)
    try:
        image = Image.open(io.BytesIO(data))
        if image.format == "JPEG" and image.mode == "RGB":
            # Decoding at 1/8 scale still entropy-decodes the whole file, so a
            # truncated or corrupt JPEG fails here, at a fraction of the cost.
            image.draft("RGB", (image.width // 8 + 1, image.height // 8 + 1))
            image.load()
            return data
        image.load()
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


def _serialize(tf, example: Example, encoded: bytes) -> bytes:
    def int_feature(v: int):
        return tf.train.Feature(int64_list=tf.train.Int64List(value=[v]))

    def bytes_feature(v: bytes):
        return tf.train.Feature(bytes_list=tf.train.BytesList(value=[v]))

    feature = {
        data_format.IMAGE: bytes_feature(encoded),
        data_format.ID: bytes_feature(example.image_id.encode()),
    }
    if example.label >= 0:
        feature[data_format.LABEL] = int_feature(example.label)
        feature[data_format.LANDMARK_ID] = int_feature(example.landmark_id)
        feature[data_format.IS_CLEAN] = int_feature(example.is_clean)
    proto = tf.train.Example(features=tf.train.Features(feature=feature))
    # Deterministic: features is a protobuf map, which otherwise serializes in
    # an order that differs between processes, so equal shards had other bytes.
    return proto.SerializeToString(deterministic=True)


def write_shard(job: ShardJob) -> ShardResult:
    """Writes one shard (to a temporary name, renamed when complete).

    Args:
      job: the shard's path, examples, whether to skip bad images, quality.

    Returns:
      What was written: counts per label and the skipped images.

    Raises:
      BadImageError: an undecodable image, unless job.skip_bad_images.
    """
    import tensorflow as tf

    result = ShardResult(job.path)
    digest = hashlib.sha256()
    tmp = job.path + ".incomplete"
    with tf.io.TFRecordWriter(tmp) as writer:
        for ex in job.examples:
            try:
                encoded = encode_image(ex.path, job.jpeg_quality)
            except BadImageError as e:
                if not job.skip_bad_images:
                    raise
                result.skipped.append((ex.image_id, ex.path, str(e).split(": ", 1)[1]))
                continue
            record = _serialize(tf, ex, encoded)
            writer.write(record)
            digest.update(len(record).to_bytes(8, "little"))
            digest.update(record)
            result.num_examples += 1
            result.num_clean += ex.is_clean
            if ex.label >= 0:
                result.label_counts[ex.label] += 1
                result.clean_label_counts[ex.label] += ex.is_clean
    file_io.rename(tmp, job.path)
    result.sha256 = digest.hexdigest()
    return result
