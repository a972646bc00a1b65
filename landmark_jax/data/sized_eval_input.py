"""Evaluation input with the aspect ratio kept: each image at its own size.

The square eval stream (input_pipeline.create_eval_dataset) squashes every
image to image_size x image_size (the GLR2020 evaluation). The resize modes
'longer_side' and 'native' (`RESIZE_MODES`; 'native' is DOLG's evaluation)
keep the aspect ratio instead, so every image has a size of its own:

  * `read_eval_index`: a first pass over this process's share of a split reads
    the ids, labels and image sizes (JPEG headers only; other formats are
    decoded);
  * `eval_image_sizes`: the size each image is resized to at one extraction
    scale, optionally rounded to a multiple so that fewer distinct shapes
    arise;
  * `create_sized_eval_dataset`: the images, decoded and resized one by one,
    each to its own size, in the same order, unbatched.

The decode, the bilinear resize and the uint8 rounding are input_pipeline's,
so a square size here gives the pixels the square eval stream gives.
retrieval/shape_buckets.py batches the images by shape.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow as tf

from landmark_jax.data import data_format, input_pipeline, shard_checks
from landmark_jax.data.data_format import RESIZE_MODES


def eval_image_sizes(
    heights: np.ndarray,
    widths: np.ndarray,
    *,
    resize: str,
    image_size: int,
    scale: float,
    multiple: int = 1,
    min_side: int = 1,
) -> np.ndarray:
    """The (height, width) every image is resized to at one extraction scale.

    Args:
      heights: int [N], the decoded images' heights.
      widths: int [N], their widths.
      resize: 'square': image_size * scale on both sides, the aspect ratio
        lost (the GLR2020 evaluation); 'longer_side': the aspect ratio kept,
        the longer side image_size * scale and the shorter one scaled by the
        same factor; 'native': the aspect ratio kept, the decoded image scaled
        by `scale` (DOLG's evaluation, cv2.resize fx = fy = scale;
        image_size unused).
      image_size: the base side ('square', 'longer_side').
      scale: the multi-scale factor.
      multiple: aspect-kept modes only: each side goes to the nearest multiple
        of it (at least `multiple`) rather than to the nearest integer, so that
        fewer distinct shapes, i.e. compiled programs, arise; 1 is exact.
      min_side: the smallest side the model takes
        (retrieval.extract.min_image_side): a side that comes out below it
        is raised to it (with a multiple, to the first multiple at or above
        it), the other side kept as computed. DOLG and cirtorch never
        upscale, their ResNets taking any side, and 1 (the default) keeps
        that; only a model with a minimum of its own (an EfficientNet with
        Keras's dynamic padding: 32 px) gets such images stretched to it
        rather than no descriptor.

    Returns:
      int64 [N, 2] sizes: round(side * factor) (half to even, as Python's and
      DOLG's round), at least min_side.

    Raises:
      ValueError: an unknown mode, a non-positive scale, image size,
        multiple or min_side, or an image with an empty side.
    """
    if resize not in RESIZE_MODES:
        raise ValueError(f"resize={resize!r}: expected one of {RESIZE_MODES}")
    if not scale > 0:
        raise ValueError(f"scale={scale!r}: must be positive")
    if not multiple >= 1 or int(multiple) != multiple:
        raise ValueError(f"size multiple={multiple!r}: must be a positive integer")
    if not min_side >= 1 or int(min_side) != min_side:
        raise ValueError(f"min_side={min_side!r}: must be a positive integer")
    if resize != "native" and not (image_size and image_size > 0):
        raise ValueError(f"image_size={image_size!r}: must be positive for resize={resize!r}")
    dims = np.stack([np.asarray(heights, np.int64), np.asarray(widths, np.int64)], axis=1)
    if dims.size and dims.min() < 1:
        row = int(np.argwhere(dims < 1)[0, 0])
        raise ValueError(f"image {row} has size {tuple(map(int, dims[row]))}: an empty side")
    if resize == "square":
        side = max(int(round(image_size * scale)), int(min_side))
        return np.full((len(dims), 2), side, np.int64)
    if resize == "native":
        exact = dims * float(scale)
    else:
        target = image_size * scale
        longer = dims.max(axis=1, keepdims=True)
        # The longer side is the target itself, not a division away from it.
        exact = np.where(dims == longer, target, dims * (target / longer))
    if multiple == 1:
        return np.maximum(np.rint(exact), int(min_side)).astype(np.int64)
    least = -(-int(min_side) // multiple)  # multiples: at least one, at least min_side
    return (np.maximum(np.rint(exact / multiple), least) * multiple).astype(np.int64)


def tf_eval_image_size(
    height: tf.Tensor,
    width: tf.Tensor,
    *,
    resize: str,
    image_size: int,
    scale: float,
    multiple: int = 1,
    min_side: int = 1,
) -> tf.Tensor | list[int]:
    """`eval_image_sizes` for one image inside a TF graph (an exported model's).

    The same rule in float64 and round half to even (tf.round, np.rint), so
    a SavedModel that resizes its input sizes it exactly as extraction does
    (tests compare the two on many sizes).

    Args:
      height: the image's height, a scalar int tensor.
      width: its width.
      resize, image_size, scale, multiple, min_side: as eval_image_sizes
        (checked there: call it once on a dummy size first).

    Returns:
      [height, width] to resize to: Python ints for 'square' (a static
      shape), else an int32 [2] tensor.
    """
    eval_image_sizes(
        np.ones(1),
        np.ones(1),
        resize=resize,
        image_size=image_size,
        scale=scale,
        multiple=multiple,
        min_side=min_side,
    )
    if resize == "square":
        side = max(int(round(image_size * scale)), int(min_side))
        return [side, side]
    dims = tf.cast(tf.stack([height, width]), tf.float64)
    if resize == "native":
        exact = dims * float(scale)
    else:
        target = float(image_size * scale)
        longer = tf.reduce_max(dims)
        exact = tf.where(
            tf.equal(dims, longer), tf.constant(target, tf.float64), dims * (target / longer)
        )
    if multiple == 1:
        sides = tf.maximum(tf.round(exact), float(min_side))
    else:
        least = float(-(-int(min_side) // multiple))
        sides = tf.maximum(tf.round(exact / multiple), least) * multiple
    return tf.cast(sides, tf.int32)


@dataclasses.dataclass(frozen=True)
class EvalIndex:
    """A process's share of a split, in its reading order, without pixels."""

    ids: np.ndarray  # str [n]
    labels: np.ndarray | None  # int64 [n] for labeled splits, else None
    heights: np.ndarray  # int64 [n]: the decoded images' sizes
    widths: np.ndarray  # int64 [n]


def read_eval_index(
    data_dir: str, split: str, *, process_index: int = 0, process_count: int = 1
) -> EvalIndex:
    """Ids, labels and image sizes of this process's examples of a split.

    JPEG sizes come from the header (tf.image.extract_jpeg_shape, the size
    decode_image gives); other formats are decoded.

    Args:
      data_dir: the data folder.
      split: the split name.
      process_index: this process.
      process_count: all processes.

    Returns:
      An EvalIndex in the order create_sized_eval_dataset reads the images.

    Raises:
      DataFormatError: the split is missing, or its shards hold another
        number of examples than dataset_info.json says.
      ValueError: fewer shards than processes.
    """
    info = data_format.read_split_info(data_dir, split)
    files, counts = input_pipeline.process_files(info, process_index, process_count)
    spec = input_pipeline.eval_feature_spec(info)

    @input_pipeline.graph_function
    def parse(record):
        ex = tf.io.parse_single_example(record, spec)
        encoded = ex[data_format.IMAGE]
        shape = tf.cond(
            tf.io.is_jpeg(encoded),
            lambda: tf.image.extract_jpeg_shape(encoded)[:2],
            lambda: tf.shape(input_pipeline.decode_image(encoded))[:2],
        )
        out = {"id": ex[data_format.ID], "shape": shape}
        if info.labeled:
            out["label"] = ex[data_format.LABEL]
        return out

    ds = (
        tf.data.TFRecordDataset(list(files))
        .map(parse, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        .batch(4096)
        .prefetch(tf.data.AUTOTUNE)
    )
    ids, shapes, labels = [], [], []
    for batch in shard_checks.checked_batches(ds, files, counts, None):
        ids.extend(i.decode() for i in batch["id"])
        shapes.append(batch["shape"].reshape(-1, 2))
        if info.labeled:
            labels.append(batch["label"])
    if len(ids) != sum(counts):
        raise shard_checks.shard_error(
            files,
            counts,
            f"{data_dir}: process {process_index}'s shards of split {split!r} hold "
            f"{len(ids)} examples, dataset_info.json says {sum(counts)}",
        )
    shape = np.concatenate(shapes).astype(np.int64) if shapes else np.zeros((0, 2), np.int64)
    return EvalIndex(
        ids=np.array(ids, dtype=str),
        labels=np.concatenate(labels).astype(np.int64) if info.labeled else None,
        heights=shape[:, 0],
        widths=shape[:, 1],
    )


def create_sized_eval_dataset(
    data_dir: str,
    split: str,
    sizes: np.ndarray,
    *,
    process_index: int = 0,
    process_count: int = 1,
):
    """This process's images of a split, each resized to its own size, in order.

    The decode and the bilinear resize are those of input_pipeline's
    streams (`tf.image.resize` from the decoded image, rounded to uint8).

    Args:
      data_dir: the data folder.
      split: the split name.
      sizes: int [n, 2] (height, width) per example of this process, in
        read_eval_index order (e.g. eval_image_sizes of its sizes).
      process_index: this process.
      process_count: all processes.

    Returns:
      An unbatched tf.data.Dataset of uint8 [h_i, w_i, 3] images.

    Raises:
      ValueError: `sizes` does not have one row per example of this process.
    """
    info = data_format.read_split_info(data_dir, split)
    files, counts = input_pipeline.process_files(info, process_index, process_count)
    sizes = np.asarray(sizes, np.int32)
    if sizes.shape != (sum(counts), 2):
        raise ValueError(
            f"sizes has shape {sizes.shape}; process {process_index} reads "
            f"{sum(counts)} examples of split {split!r}: expected ({sum(counts)}, 2)"
        )
    spec = {data_format.IMAGE: tf.io.FixedLenFeature([], tf.string)}

    @input_pipeline.graph_function
    def load(record, size):
        encoded = tf.io.parse_single_example(record, spec)[data_format.IMAGE]
        return input_pipeline.to_uint8(
            input_pipeline.resize_image(input_pipeline.decode_image(encoded), size)
        )

    ds = tf.data.Dataset.zip(
        (tf.data.TFRecordDataset(list(files)), tf.data.Dataset.from_tensor_slices(sizes))
    )
    return ds.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).prefetch(
        tf.data.AUTOTUNE
    )
