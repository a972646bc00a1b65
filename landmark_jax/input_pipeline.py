"""tf.data input: TFRecord shards -> global jax arrays on the device mesh.

Train stream. Each process reads its own shards (files[process_index::count]).
An epoch visits the process's shards in a seeded order, in *chunks* of
`files_per_chunk` shards that are interleaved and shuffled together; the next
epoch reshuffles. Every element is therefore a pure function of (seed,
position), which gives two things:
  * determinism: the same seed gives the same batches;
  * resume without replay: to start at step s the stream computes which epoch
    and chunk example s * local_batch falls in, and skips only inside that
    chunk (serialized records, before any decoding).
The left-right flip, the only augmentation, is drawn from a stateless RNG
keyed by the example's position, so it too is reproduced on resume.

Images travel to the device as uint8 (a quarter of float32's host-to-device
traffic); the model normalises pixels as its first op, with the constants of
the weights it was initialised from (see landmark_jax.models).

Eval stream. Every example of a split exactly once, in file order, padded to
whole batches with `mask=False` rows, with the ids kept on the host. All
processes run the same number of steps (the largest share) since each step is
a collective computation.

Aspect-kept eval input (`read_eval_index`, `eval_image_sizes`,
`create_sized_eval_dataset`): a first pass reads the ids, labels and image
sizes (JPEG headers only); the images are then decoded and resized one by
one, each to its own size, with the aspect ratio kept (`longer_side` or
`native`); retrieval/extract.py batches them by shape.
"""

from __future__ import annotations

import collections
import dataclasses
import math
from collections.abc import Iterator
from typing import Any

import jax
import numpy as np
import tensorflow as tf
from jax.sharding import Mesh

from landmark_jax import data_format, sharding

_MAX_EPOCHS = 2**62


def _process_files(split: data_format.SplitInfo, process_index: int, process_count: int):
    if len(split.files) < process_count:
        raise ValueError(
            f"split {split.name!r} has {len(split.files)} shard file(s), fewer than the "
            f"{process_count} processes; rebuild it with --num_shards >= {process_count}"
        )
    return (
        split.files[process_index::process_count],
        split.file_examples[process_index::process_count],
    )


def _decode(encoded):
    # channels=3 turns grayscale into RGB; expand_animations=False keeps a
    # GIF/PNG a single [H, W, 3] frame.
    image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
    image.set_shape([None, None, 3])
    return image


def _decode_and_resize(encoded, image_size: int):
    return _resize(_decode(encoded), [image_size, image_size])


def _resize(image, size):
    """The one resize of every pipeline: bilinear from the decoded image."""
    return tf.image.resize(image, size, method="bilinear")


def _to_uint8(image):
    return tf.cast(tf.clip_by_value(tf.round(image), 0.0, 255.0), tf.uint8)


def _chunk_start(perm: np.ndarray, counts: np.ndarray, files_per_chunk: int, offset: int):
    """(chunk index, examples to skip in it) of an offset into an epoch."""
    chunk_sizes = [
        int(counts[perm[i : i + files_per_chunk]].sum())
        for i in range(0, len(perm), files_per_chunk)
    ]
    for chunk, size in enumerate(chunk_sizes):
        if offset < size:
            return chunk, offset
        offset -= size
    raise AssertionError("offset beyond the epoch")


def create_train_dataset(
    data_dir: str,
    *,
    image_size: int,
    local_batch_size: int,
    seed: int,
    start_step: int = 0,
    split: str = "train",
    process_index: int = 0,
    process_count: int = 1,
    files_per_chunk: int = 16,
    shuffle_buffer: int = 4096,
    flip: bool = True,
):
    """The host-local training stream: infinite batches of numpy-ready tensors.

    Args:
      data_dir: the data folder (shards + dataset_info.json).
      image_size: side of the square the images are resized to.
      local_batch_size: this process's examples per step.
      seed: the stream's seed (shard order, shuffles, flips).
      start_step: the first step to produce; the stream equals the
        uninterrupted one from that step on.
      split: a labeled split, normally 'train'.
      process_index: this process (jax.process_index()).
      process_count: all processes (jax.process_count()).
      files_per_chunk: shards interleaved and shuffled together.
      shuffle_buffer: shuffle buffer within a chunk, in examples.
      flip: random left-right flip (p = 0.5).

    Returns:
      A tf.data.Dataset of dicts: image uint8 [B, S, S, 3], label int32 [B],
      is_clean int32 [B].

    Raises:
      DataFormatError: the data folder is incomplete or inconsistent.
      ValueError: fewer shards than processes, or an unlabeled split.
    """
    info = data_format.read_split_info(data_dir, split)
    if not info.labeled:
        raise ValueError(
            f"split {split!r} has no labels; train on one of {data_format.LABELED_SPLITS}"
        )
    num_classes = data_format.read_num_classes(data_dir)
    files, counts = _process_files(info, process_index, process_count)
    counts = np.asarray(counts, np.int64)
    epoch_len = int(counts.sum())
    if epoch_len == 0:
        raise ValueError(
            f"split {split!r} of {data_dir} has no examples for process {process_index}"
        )
    num_files = len(files)
    num_chunks = math.ceil(num_files / files_per_chunk)

    def epoch_order(epoch):
        return tf.random.experimental.stateless_shuffle(
            tf.range(num_files, dtype=tf.int64), seed=tf.stack([tf.constant(seed, tf.int64), epoch])
        )

    start = start_step * local_batch_size
    start_epoch, offset = divmod(start, epoch_len)
    perm0 = epoch_order(tf.constant(start_epoch, tf.int64)).numpy()
    start_chunk, skip_in_chunk = _chunk_start(perm0, counts, files_per_chunk, offset)

    files_t = tf.constant(files)

    def chunks_of_epoch(epoch):
        order = epoch_order(epoch)
        return tf.data.Dataset.range(num_chunks).map(lambda c: (epoch, c, order))

    def chunk_records(epoch, chunk, order):
        idx = order[chunk * files_per_chunk : (chunk + 1) * files_per_chunk]
        records = tf.data.Dataset.from_tensor_slices(tf.gather(files_t, idx)).interleave(
            tf.data.TFRecordDataset,
            cycle_length=files_per_chunk,
            block_length=1,
            num_parallel_calls=tf.data.AUTOTUNE,
            deterministic=True,
        )
        chunk_seed = (seed * 1_000_003 + epoch * 10_007 + chunk) % (2**31 - 1)
        return records.shuffle(shuffle_buffer, seed=chunk_seed)

    spec = {
        data_format.IMAGE: tf.io.FixedLenFeature([], tf.string),
        data_format.LABEL: tf.io.FixedLenFeature([], tf.int64),
        data_format.IS_CLEAN: tf.io.FixedLenFeature([], tf.int64),
    }

    def parse(position, record):
        # No default_value: a record without a label is an error, never class 0.
        ex = tf.io.parse_single_example(record, spec)
        label = ex[data_format.LABEL]
        tf.debugging.assert_less(
            label,
            tf.constant(num_classes, tf.int64),
            message=f"{data_format.LABEL} >= num_classes={num_classes} in {data_dir}",
        )
        tf.debugging.assert_non_negative(
            label, message=f"negative {data_format.LABEL} in {data_dir}"
        )
        image = _decode_and_resize(ex[data_format.IMAGE], image_size)
        if flip:
            coin = tf.random.stateless_uniform(
                [], seed=tf.stack([tf.constant(seed, tf.int64), position])
            )
            image = tf.cond(coin < 0.5, lambda: tf.reverse(image, axis=[1]), lambda: image)
        return {
            "image": _to_uint8(image),
            "label": tf.cast(label, tf.int32),
            "is_clean": tf.cast(ex[data_format.IS_CLEAN], tf.int32),
        }

    ds = (
        tf.data.Dataset.range(start_epoch, _MAX_EPOCHS)
        .flat_map(chunks_of_epoch)
        .skip(start_chunk)
        .flat_map(chunk_records)
        .skip(skip_in_chunk)
        .enumerate(start=start)
        .map(parse, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        .batch(local_batch_size, drop_remainder=True)
        .prefetch(tf.data.AUTOTUNE)
    )
    options = tf.data.Options()
    options.deterministic = True
    return ds.with_options(options)


def _eval_feature_spec(info: data_format.SplitInfo) -> dict[str, Any]:
    """What an eval record is parsed into: image bytes, id, and the label of
    a labelled split (a missing label is a parse error, never class 0)."""
    spec = {
        data_format.IMAGE: tf.io.FixedLenFeature([], tf.string),
        data_format.ID: tf.io.FixedLenFeature([], tf.string),
    }
    if info.labeled:
        spec[data_format.LABEL] = tf.io.FixedLenFeature([], tf.int64)
    return spec


def num_eval_steps(data_dir: str, split: str, local_batch_size: int, process_count: int = 1) -> int:
    """Steps every process runs to cover its share of a split (the largest share)."""
    info = data_format.read_split_info(data_dir, split)
    return max(
        math.ceil(sum(info.file_examples[p::process_count]) / local_batch_size)
        for p in range(process_count)
    )


def create_eval_dataset(
    data_dir: str,
    split: str,
    *,
    image_size: int,
    local_batch_size: int,
    process_index: int = 0,
    process_count: int = 1,
):
    """The host-local eval stream: each example once, in order, padded.

    Args:
      data_dir: the data folder.
      split: 'val', 'index', 'test' (or 'train').
      image_size: side of the square the images are resized to.
      local_batch_size: this process's examples per step.
      process_index: this process.
      process_count: all processes.

    Returns:
      (dataset, num_steps): dicts of image uint8 [B, S, S, 3], mask bool [B]
      (False on padding), id string [B], and label int32 [B] for labeled
      splits; exactly num_steps batches, the same number in every process.
    """
    info = data_format.read_split_info(data_dir, split)
    files, counts = _process_files(info, process_index, process_count)
    num_local = sum(counts)
    num_steps = num_eval_steps(data_dir, split, local_batch_size, process_count)

    spec = _eval_feature_spec(info)

    def parse(record):
        ex = tf.io.parse_single_example(record, spec)
        out = {
            "image": _to_uint8(_decode_and_resize(ex[data_format.IMAGE], image_size)),
            "id": ex[data_format.ID],
            "mask": tf.constant(True),
        }
        if info.labeled:
            out["label"] = tf.cast(ex[data_format.LABEL], tf.int32)
        return out

    padding = {
        "image": tf.zeros([image_size, image_size, 3], tf.uint8),
        "id": tf.constant(b""),
        "mask": tf.constant(False),
    }
    if info.labeled:
        padding["label"] = tf.constant(0, tf.int32)
    ds = (
        tf.data.TFRecordDataset(list(files))
        .map(parse, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        .concatenate(
            tf.data.Dataset.from_tensors(padding).repeat(num_steps * local_batch_size - num_local)
        )
        .batch(local_batch_size, drop_remainder=True)
        .prefetch(tf.data.AUTOTUNE)
    )
    return ds, num_steps


RESIZE_MODES = ("square", "longer_side", "native")


def eval_image_sizes(
    heights: np.ndarray,
    widths: np.ndarray,
    *,
    resize: str,
    image_size: int,
    scale: float,
    multiple: int = 1,
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

    Returns:
      int64 [N, 2] sizes: round(side * factor) (half to even, as Python's and
      DOLG's round), at least 1.

    Raises:
      ValueError: an unknown mode, a non-positive scale, image size or
        multiple, or an image with an empty side.
    """
    if resize not in RESIZE_MODES:
        raise ValueError(f"resize={resize!r}: expected one of {RESIZE_MODES}")
    if not scale > 0:
        raise ValueError(f"scale={scale!r}: must be positive")
    if not multiple >= 1 or int(multiple) != multiple:
        raise ValueError(f"size multiple={multiple!r}: must be a positive integer")
    if resize != "native" and not (image_size and image_size > 0):
        raise ValueError(f"image_size={image_size!r}: must be positive for resize={resize!r}")
    dims = np.stack([np.asarray(heights, np.int64), np.asarray(widths, np.int64)], axis=1)
    if dims.size and dims.min() < 1:
        row = int(np.argwhere(dims < 1)[0, 0])
        raise ValueError(f"image {row} has size {tuple(map(int, dims[row]))}: an empty side")
    if resize == "square":
        side = max(int(round(image_size * scale)), 1)
        return np.full((len(dims), 2), side, np.int64)
    if resize == "native":
        exact = dims * float(scale)
    else:
        target = image_size * scale
        longer = dims.max(axis=1, keepdims=True)
        # The longer side is the target itself, not a division away from it.
        exact = np.where(dims == longer, target, dims * (target / longer))
    if multiple == 1:
        return np.maximum(np.rint(exact), 1).astype(np.int64)
    return (np.maximum(np.rint(exact / multiple), 1) * multiple).astype(np.int64)


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
    files, counts = _process_files(info, process_index, process_count)
    spec = _eval_feature_spec(info)

    def parse(record):
        ex = tf.io.parse_single_example(record, spec)
        encoded = ex[data_format.IMAGE]
        shape = tf.cond(
            tf.io.is_jpeg(encoded),
            lambda: tf.image.extract_jpeg_shape(encoded)[:2],
            lambda: tf.shape(_decode(encoded))[:2],
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
    for batch in ds.as_numpy_iterator():
        ids.extend(i.decode() for i in batch["id"])
        shapes.append(batch["shape"].reshape(-1, 2))
        if info.labeled:
            labels.append(batch["label"])
    if len(ids) != sum(counts):
        raise data_format.DataFormatError(
            f"{data_dir}: process {process_index}'s shards of split {split!r} hold "
            f"{len(ids)} examples, dataset_info.json says {sum(counts)}; rebuild the split"
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

    The decode and the bilinear resize are those of every other pipeline
    here (`tf.image.resize` from the decoded image, rounded to uint8).

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
    files, counts = _process_files(info, process_index, process_count)
    sizes = np.asarray(sizes, np.int32)
    if sizes.shape != (sum(counts), 2):
        raise ValueError(
            f"sizes has shape {sizes.shape}; process {process_index} reads "
            f"{sum(counts)} examples of split {split!r}: expected ({sum(counts)}, 2)"
        )
    spec = {data_format.IMAGE: tf.io.FixedLenFeature([], tf.string)}

    def load(record, size):
        encoded = tf.io.parse_single_example(record, spec)[data_format.IMAGE]
        return _to_uint8(_resize(_decode(encoded), size))

    ds = tf.data.Dataset.zip(
        (tf.data.TFRecordDataset(list(files)), tf.data.Dataset.from_tensor_slices(sizes))
    )
    return ds.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).prefetch(
        tf.data.AUTOTUNE
    )


def _to_device(dataset, mesh: Mesh, prefetch: int) -> Iterator[Any]:
    """Yields global arrays, keeping `prefetch` batches in flight to the devices."""
    queue: collections.deque = collections.deque()
    for batch in dataset.as_numpy_iterator():
        host = {k: v for k, v in batch.items() if k != "id"}
        item = sharding.host_local_to_global(host, mesh)
        if "id" in batch:
            item = (item, np.array([i.decode() for i in batch["id"]]))
        queue.append(item)
        if len(queue) > prefetch:
            yield queue.popleft()
    while queue:
        yield queue.popleft()


def train_iterator(
    data_dir: str,
    *,
    mesh: Mesh,
    global_batch_size: int,
    image_size: int,
    seed: int,
    start_step: int = 0,
    prefetch: int = 2,
    **kwargs,
) -> Iterator[dict[str, jax.Array]]:
    """Global training batches sharded on the mesh's data axis.

    Args:
      data_dir: the data folder.
      mesh: the device mesh (all processes).
      global_batch_size: examples per step over all devices.
      image_size: side of the square images.
      seed: the stream's seed.
      start_step: the first step to produce (exact resume).
      prefetch: batches kept in flight to the devices.
      **kwargs: more options of create_train_dataset (split, files_per_chunk,
        shuffle_buffer, flip).

    Returns:
      An infinite iterator of {'image', 'label', 'is_clean'} global arrays.
    """
    ds = create_train_dataset(
        data_dir,
        image_size=image_size,
        local_batch_size=sharding.local_batch_size(global_batch_size, mesh),
        seed=seed,
        start_step=start_step,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        **kwargs,
    )
    return _to_device(ds, mesh, prefetch)


def eval_iterator(
    data_dir: str,
    split: str,
    *,
    mesh: Mesh,
    global_batch_size: int,
    image_size: int,
    prefetch: int = 2,
) -> tuple[Iterator[tuple[dict[str, jax.Array], np.ndarray]], int]:
    """Global eval batches plus this process's ids, covering a split once.

    Returns:
      (iterator, num_steps). The iterator yields (batch, ids): batch holds
      'image', 'mask' (and 'label' for labeled splits) as global arrays; ids
      is a numpy array of this process's rows' ids ('' on padding rows).
    """
    ds, num_steps = create_eval_dataset(
        data_dir,
        split,
        image_size=image_size,
        local_batch_size=sharding.local_batch_size(global_batch_size, mesh),
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    return _to_device(ds, mesh, prefetch), num_steps
