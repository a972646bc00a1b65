"""Aspect-kept extraction: images batched by shape, each process on its own devices.

With `resize='longer_side'` or `'native'` (sized_eval_input.eval_image_sizes)
the images of a split differ in shape, and every distinct shape is one
compiled program, so they are batched by shape. A first pass reads the image
sizes (JPEG headers); each process then streams its own images, decoded and
resized one by one, into per-shape batches of up to its share of the global
batch (fewer rows for a rare shape, a multiple of its device count), runs
each batch as soon as it is full and the partial ones at the end, padded with
zero rows that are dropped. These programs run on the process's own devices
(`process_mesh`), so processes need not agree on an order of shapes; the only
collective is one gather of the finished embeddings at the end
(`allgather_shares`), after which `file_order` puts every process's rows back
in the split's file order. An image's embedding is that of the model applied
to it alone (batch rows are independent in inference), to float tolerance.

retrieval/extract.py takes this path for the aspect-kept resize modes
(share_embeddings, then allgather_shares and file_order) and turns the merged
rows into its Embeddings.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import tqdm
from jax.experimental import multihost_utils

from landmark_jax.data import sized_eval_input
from landmark_jax.models import layers, superglobal_pooling
from landmark_jax.runtime import sharding


def process_mesh(mesh) -> Any:
    """The mesh's devices of this process, as a 1-D data mesh."""
    local = [d for d in mesh.devices.flat if d.process_index == jax.process_index()]
    if not local:
        raise ValueError(f"the mesh has no device of process {jax.process_index()}")
    return sharding.create_mesh(local)


def bucket_rows(sizes: np.ndarray, max_rows: int, row_multiple: int) -> dict[tuple[int, int], int]:
    """The rows of every batch of each image shape.

    Args:
      sizes: int [N, 2] (height, width) of the resized images.
      max_rows: rows of a full batch (this process's share of the global
        batch), a multiple of row_multiple.
      row_multiple: the number of devices the batch is split over.

    Returns:
      {(height, width): rows}: max_rows, or for a shape with fewer images
      their number rounded up to row_multiple, so that a rare shape is not
      padded to a full batch.

    Raises:
      ValueError: max_rows is not a positive multiple of row_multiple.
    """
    if max_rows < 1 or row_multiple < 1 or max_rows % row_multiple:
        raise ValueError(
            f"batch rows={max_rows} must be a positive multiple of the {row_multiple} devices"
        )
    shapes, counts = np.unique(np.asarray(sizes).reshape(-1, 2), axis=0, return_counts=True)
    return {
        (int(h), int(w)): min(max_rows, -(-int(c) // row_multiple) * row_multiple)
        for (h, w), c in zip(shapes, counts, strict=True)
    }


def _stack(group: list[tuple[int, np.ndarray]], rows: int) -> tuple[np.ndarray, np.ndarray]:
    indices = np.array([i for i, _ in group], np.int64)
    first = group[0][1]
    batch = np.zeros((rows, *first.shape), first.dtype)
    batch[: len(group)] = np.stack([image for _, image in group])
    return indices, batch


def bucket_batches(
    images: Iterable[np.ndarray], rows: dict[tuple[int, int], int]
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Groups a stream of images into batches of one shape.

    Args:
      images: [h, w, C] arrays, e.g. create_sized_eval_dataset's.
      rows: rows per batch of each (h, w), from bucket_rows.

    Yields:
      (indices, batch): batch [rows[shape], h, w, C] holds the images at
      stream positions `indices` in its first len(indices) rows, in stream
      order; the remaining rows are zeros, padding whose outputs the caller
      drops. A shape's batch comes as soon as it is full; the partial ones
      after the stream ends, in the order their shapes first appeared. Every
      image is in exactly one batch.

    Raises:
      ValueError: an image whose shape has no entry in `rows`.
    """
    pending: dict[tuple[int, int], list[tuple[int, np.ndarray]]] = {}
    for i, image in enumerate(images):
        shape = (int(image.shape[0]), int(image.shape[1]))
        if shape not in rows:
            raise ValueError(f"image {i} has shape {shape}, which has no batch size in {rows}")
        group = pending.setdefault(shape, [])
        group.append((i, image))
        if len(group) == rows[shape]:
            pending[shape] = []
            yield _stack(group, rows[shape])
    for shape, group in pending.items():
        if group:
            yield _stack(group, rows[shape])


def share_embeddings(
    embed,
    variables,
    data_dir: str,
    split: str,
    *,
    scales: Sequence[float],
    image_size: int,
    resize: str,
    size_multiple: int,
    local_rows: int,
    local_mesh,
    process_index: int,
    process_count: int,
    min_side: int = 1,
    scale_gem: bool = False,
) -> dict[str, np.ndarray]:
    """One process's share of a split, embedded on its devices (aspect kept).

    Args:
      embed: jit(variables, images uint8 [B, H, W, 3]) -> [B, D], the sum of
        the unit embeddings of an image's views.
      variables: the model's variables, replicated on `local_mesh`.
      data_dir: the data folder.
      split: the split name.
      scales: image-size multipliers whose embeddings are summed.
      image_size: the base side (sized_eval_input.eval_image_sizes).
      resize: 'longer_side' or 'native'.
      size_multiple: sides rounded to a multiple of it; 1 is exact.
      local_rows: rows of a full batch, a multiple of local_mesh's devices.
      local_mesh: this process's devices (process_mesh).
      process_index: this process.
      process_count: all processes.
      min_side: the smallest side the model takes (extract.min_image_side):
        a resized side below it is raised to it, and logged with the first
        such image's id.
      scale_gem: combine the scales by SuperGlobal's Scale-GeM (the maximum
        of each scale's normalised sum; superglobal_pooling.scale_gem)
        instead of summing them.

    Returns:
      {'ids': str [n], 'embeddings': float32 [n, D] unit rows,
      'labels': int64 [n] (-1 when unlabeled)} in the process's reading order.
    """
    index = sized_eval_input.read_eval_index(
        data_dir, split, process_index=process_index, process_count=process_count
    )
    n = len(index.ids)
    probe = jax.ShapeDtypeStruct((local_mesh.devices.size, 32, 32, 3), jnp.uint8)
    dim = jax.eval_shape(embed, variables, probe).shape[-1]
    total = np.zeros((n, dim), np.float32)
    per_scale = []
    placement = sharding.batch_sharding(local_mesh)

    def finish(item):
        indices, out = item
        total[indices] += np.asarray(out)[: len(indices)]
        progress.update(len(indices))

    for scale in scales:
        if scale_gem:  # this scale's sums alone
            total = np.zeros((n, dim), np.float32)
            per_scale.append(total)
        size_rule = dict(resize=resize, image_size=image_size, scale=scale, multiple=size_multiple)
        sizes = sized_eval_input.eval_image_sizes(
            index.heights, index.widths, min_side=min_side, **size_rule
        )
        if min_side > 1:
            unraised = sized_eval_input.eval_image_sizes(index.heights, index.widths, **size_rule)
            _log_raised_sides(index, sizes, unraised, split, scale, min_side)
        rows = bucket_rows(sizes, local_rows, local_mesh.devices.size)
        counts = collections.Counter((int(h), int(w)) for h, w in sizes)
        logging.info(
            "Embedding %d %s images @ scale %g (%s): %d shapes (compiled programs), %d steps",
            n,
            split,
            scale,
            resize,
            len(rows),
            sum(-(-c // rows[shape]) for shape, c in counts.items()),
        )
        images = sized_eval_input.create_sized_eval_dataset(
            data_dir, split, sizes, process_index=process_index, process_count=process_count
        )
        progress = tqdm.tqdm(
            total=n,
            desc=f"embedding {split} @x{scale:g} ({len(rows)} shapes)",
            unit="image",
            disable=process_index != 0,
        )
        in_flight: collections.deque = collections.deque()  # overlap host and device
        for indices, batch in bucket_batches(images.as_numpy_iterator(), rows):
            in_flight.append((indices, embed(variables, jax.device_put(batch, placement))))
            if len(in_flight) > 2:
                finish(in_flight.popleft())
        while in_flight:
            finish(in_flight.popleft())
        progress.close()
    if scale_gem:
        total = superglobal_pooling.scale_gem(np.stack(per_scale), xp=np)
    total = layers.l2_normalize_rows(total)
    labels = index.labels if index.labels is not None else np.full(n, -1, np.int64)
    return {"ids": index.ids, "embeddings": total, "labels": labels}


def _log_raised_sides(
    index: sized_eval_input.EvalIndex,
    sizes: np.ndarray,
    unraised: np.ndarray,
    split: str,
    scale: float,
    min_side: int,
) -> None:
    """Names the images whose side eval_image_sizes raised to the model's minimum."""
    raised = np.flatnonzero((sizes != unraised).any(axis=1))
    if len(raised):
        i = int(raised[0])
        logging.warning(
            "%s @ scale %g: %d image(s) with a side under the model's minimum of %d px "
            "were stretched to it, e.g. image %r (%dx%d decoded, resized to %dx%d)",
            split,
            scale,
            len(raised),
            min_side,
            str(index.ids[i]),
            int(index.heights[i]),
            int(index.widths[i]),
            int(sizes[i, 0]),
            int(sizes[i, 1]),
        )


def file_order(
    shares: Sequence[dict[str, np.ndarray]], file_examples: Sequence[int]
) -> dict[str, np.ndarray]:
    """Every process's rows merged into the split's file order.

    Process q reads files q, q + P, ... (input_pipeline.process_files), so
    file f's rows are the next file_examples[f] rows of process f % P.

    Args:
      shares: each process's rows (dicts of equal keys), in its reading order.
      file_examples: the examples of each shard file of the split.

    Returns:
      The rows of every key, concatenated in file order.

    Raises:
      AssertionError: the shares' row counts do not match file_examples.
    """
    count = len(shares)
    offsets = [0] * count
    pieces = []
    for f, examples in enumerate(file_examples):
        q = f % count
        pieces.append({k: v[offsets[q] : offsets[q] + examples] for k, v in shares[q].items()})
        offsets[q] += examples
    if offsets != [len(s["ids"]) for s in shares]:
        raise AssertionError(f"process rows {offsets} do not add up to the shards' counts")
    return {k: np.concatenate([p[k] for p in pieces]) for k in shares[0]}


def allgather_shares(
    share: dict[str, np.ndarray], counts: Sequence[int]
) -> list[dict[str, np.ndarray]]:
    """Every process's share on every process (one collective).

    Args:
      share: this process's rows, numeric arrays (every process the same keys,
        dtypes and trailing shapes).
      counts: the rows of every process's share.

    Returns:
      The shares of processes 0..P-1, each cut back to its own rows.
    """
    if jax.process_count() == 1:
        return [share]
    rows = max(counts)
    padded = {
        k: np.concatenate([v, np.zeros((rows - len(v), *v.shape[1:]), v.dtype)])
        for k, v in share.items()
    }
    stacked = jax.tree.map(np.asarray, multihost_utils.process_allgather(padded, tiled=False))
    return [{k: v[q, : counts[q]] for k, v in stacked.items()} for q in range(len(counts))]
