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
Augmentation (train_augmentation.py: the left-right flip, and optionally
GLR2021's JPEG re-encode, ShiftScaleRotate and Cutout) is drawn from a
stateless RNG keyed by the example's position, so it too is reproduced on
resume.

Images travel to the device as uint8 (a quarter of float32's host-to-device
traffic); the model normalises pixels as its first op, with the constants of
the weights it was initialised from (see landmark_jax.models).

Eval stream. Every example of a split exactly once, in file order, padded to
whole batches with `mask=False` rows, with the ids kept on the host. All
processes run the same number of steps (the largest share) since each step is
a collective computation.

Aspect-kept eval input, each image resized to its own size, is in
sized_eval_input.py.
"""

from __future__ import annotations

import collections
import math
from collections.abc import Iterator
from typing import Any

import jax
import numpy as np
import tensorflow as tf
from jax.sharding import Mesh

from landmark_jax.data import data_format, shard_checks
from landmark_jax.data.augmentation_settings import Augmentation
from landmark_jax.data.train_augmentation import augment_decoded, augment_resized
from landmark_jax.runtime import sharding

_MAX_EPOCHS = 2**62
FLIP_ONLY = Augmentation()


def process_files(split: data_format.SplitInfo, process_index: int, process_count: int):
    """(files, examples per file) a process reads: every process_count-th
    shard from process_index on.

    Raises:
      ValueError: fewer shards than processes.
    """
    if len(split.files) < process_count:
        raise ValueError(
            f"split {split.name!r} has {len(split.files)} shard file(s), fewer than the "
            f"{process_count} processes; rebuild it with --num_shards >= {process_count}"
        )
    return (
        split.files[process_index::process_count],
        split.file_examples[process_index::process_count],
    )


def graph_function(fn):
    """`fn`, marked for tf.data to trace as written, without AutoGraph.

    tf.data hands every function it is given to AutoGraph, which parses and
    rewrites its source and that of every function it calls (about 1 s of CPU
    per process for the training stream). The project's tf.data functions are
    written as graphs already (tf.cond, no Python control flow on tensors), so
    the rewrite changes nothing in them; one that branched on a tensor in
    Python would fail when traced, naming the tensor.
    """
    return tf.autograph.experimental.do_not_convert(fn)


def decode_image(encoded):
    """Encoded image bytes (any format tf.io.decode_image reads) -> uint8 [H, W, 3]."""
    # channels=3 turns grayscale into RGB; expand_animations=False keeps a
    # GIF/PNG a single [H, W, 3] frame.
    image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
    image.set_shape([None, None, 3])
    return image


def _decode_and_resize(encoded, image_size: int):
    return resize_image(decode_image(encoded), [image_size, image_size])


def resize_image(image, size):
    """The one resize of every pipeline: bilinear from the decoded image."""
    return tf.image.resize(image, size, method="bilinear")


def to_uint8(image):
    """Float pixels rounded and clipped to uint8."""
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
    augmentation: Augmentation = FLIP_ONLY,
):
    """The host-local training stream: infinite batches of numpy-ready tensors.

    Args:
      data_dir: the data set (a TFDS build; data_format.find_build).
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
      augmentation: the random transforms of each image (default: the
        left-right flip only).

    Returns:
      A tf.data.Dataset of dicts: image uint8 [B, S, S, 3], label int32 [B],
      is_clean int32 [B].

    Raises:
      DataFormatError: the data folder is incomplete or inconsistent, or a
        shard this process reads holds another number of records than
        dataset_info.json lists or is cut inside a record (named, with both
        counts; shard_checks.verify_counts).
      ValueError: fewer shards than processes, or an unlabeled split.
    """
    info = data_format.read_split_info(data_dir, split)
    if not info.labeled:
        raise ValueError(
            f"split {split!r} has no labels; train on one of {data_format.LABELED_SPLITS}"
        )
    num_classes = data_format.read_num_classes(data_dir)
    files, counts = process_files(info, process_index, process_count)
    # The resume arithmetic below trusts these counts, and the endless
    # stream cannot count what it reads: a shard that holds other numbers is
    # refused now, by name (each process checks the shards it reads).
    shard_checks.verify_counts(files, counts, f"split {split!r} of {data_dir}")
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

    @graph_function
    def chunks_of_epoch(epoch):
        order = epoch_order(epoch)
        return tf.data.Dataset.range(num_chunks).map(graph_function(lambda c: (epoch, c, order)))

    @graph_function
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

    @graph_function
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
        key = tf.stack([tf.constant(seed, tf.int64), position])
        image = augment_decoded(decode_image(ex[data_format.IMAGE]), key, augmentation)
        image = resize_image(image, [image_size, image_size])
        if augmentation.flip:
            coin = tf.random.stateless_uniform([], seed=key)
            image = tf.cond(coin < 0.5, lambda: tf.reverse(image, axis=[1]), lambda: image)
        image = augment_resized(image, key, augmentation)
        return {
            "image": to_uint8(image),
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


def eval_feature_spec(info: data_format.SplitInfo) -> dict[str, Any]:
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
    files, counts = process_files(info, process_index, process_count)
    num_steps = num_eval_steps(data_dir, split, local_batch_size, process_count)

    spec = eval_feature_spec(info)

    @graph_function
    def parse(record):
        ex = tf.io.parse_single_example(record, spec)
        out = {
            "image": to_uint8(_decode_and_resize(ex[data_format.IMAGE], image_size)),
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
    # Padding to exactly num_steps batches whatever the shards hold: a shard
    # shorter than recorded must not push real images out of the last batch
    # (eval_iterator then reports the shard).
    ds = (
        tf.data.TFRecordDataset(list(files))
        .map(parse, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        .concatenate(tf.data.Dataset.from_tensors(padding).repeat())
        .take(num_steps * local_batch_size)
        .batch(local_batch_size, drop_remainder=True)
        .prefetch(tf.data.AUTOTUNE)
    )
    return ds, num_steps


def _to_device(
    dataset, mesh: Mesh, prefetch: int, files, counts, expected_rows: int | None = None
) -> Iterator[Any]:
    """Yields global arrays, keeping `prefetch` batches in flight to the devices."""
    queue: collections.deque = collections.deque()
    for batch in shard_checks.checked_batches(dataset, files, counts, expected_rows):
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
        shuffle_buffer, augmentation).

    Returns:
      An infinite iterator of {'image', 'label', 'is_clean'} global arrays.

    Raises:
      DataFormatError: as create_train_dataset (a shard with another number
        of records is refused here, before training), or later, while
        iterating, a corrupt record, naming its shard.
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
    info = data_format.read_split_info(data_dir, kwargs.get("split", "train"))
    files, counts = process_files(info, jax.process_index(), jax.process_count())
    return _to_device(ds, mesh, prefetch, files, counts)


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
    info = data_format.read_split_info(data_dir, split)
    files, counts = process_files(info, jax.process_index(), jax.process_count())
    return _to_device(ds, mesh, prefetch, files, counts, expected_rows=sum(counts)), num_steps
