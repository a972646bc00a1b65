"""Embeddings of a split from a restored model, sharded over all devices.

A run is restored once (`load_trained_model`: its config.json's model, the
checkpoint's params and batch statistics, no optimizer state) and every
split, scale and view is extracted from that `TrainedModel`.

Every image of the split is embedded exactly once (the eval pipeline pads the
last batch and masks it out), with optional flip and multi-scale averaging:
each view's embedding is L2-normalised, the views are averaged, and the mean
is normalised again (as the DOLG and cirtorch evaluation code do). Scales
re-read the images at round(image_size * scale), so a larger scale sees more
pixels of the original, not an upsampled copy. Results are written to
`<workdir>/eval/embeddings-<split>.npz` (ids, embeddings, labels) so search can
be re-run without the model.

`resize='square'` (the default, GLR2020) squashes every image to a square.
`'longer_side'` and `'native'` keep the aspect ratio
(input_pipeline.eval_image_sizes): images then differ in shape, and every
distinct shape is one compiled program, so they are batched by shape. A first
pass reads the image sizes (JPEG headers); each process then streams its own
images, decoded and resized one by one, into per-shape batches of up to its
share of the global batch (fewer rows for a rare shape, a multiple of its
device count), runs each batch as soon as it is full and the partial ones at
the end, padded with zero rows that are dropped. These programs run on the
process's own devices, so processes need not agree on an order of shapes;
the only collective is one gather of the finished embeddings at the end. An
image's embedding is that of the model applied to it alone (batch rows are
independent in inference), to float tolerance.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tqdm
from jax.experimental import multihost_utils

from landmark_jax import checkpointing, data_format, file_io, input_pipeline, sharding
from landmark_jax.models import create_model

_ID_BYTES = 64  # ids travel between processes as fixed-width bytes


@dataclasses.dataclass(frozen=True)
class Embeddings:
    """A split's embeddings: ids [N] str, embeddings [N, D] float32 unit rows,
    labels [N] int (contiguous train labels, -1 for unlabeled splits)."""

    ids: np.ndarray
    embeddings: np.ndarray
    labels: np.ndarray
    settings: dict | None = None  # how they were made (checkpoint, scales...)

    def save(self, path: str) -> None:
        file_io.save_npz(
            path,
            ids=self.ids,
            embeddings=self.embeddings,
            labels=self.labels,
            settings=json.dumps(self.settings),
        )

    @classmethod
    def load(cls, path: str) -> Embeddings:
        f = file_io.load_npz(path)
        return cls(f["ids"], f["embeddings"], f["labels"], json.loads(str(f["settings"])))


@dataclasses.dataclass(frozen=True)
class TrainedModel:
    """A run's model, restored once for a whole evaluation.

    Attributes:
      config: the run's own config (run_config.evaluation_config): its
        resolved model block built `module`; data_dir and eval.* are the
        evaluation's.
      workdir: the run's workdir.
      step: the checkpoint step that was restored.
      module: the embedding model.
      variables: {'params', 'batch_stats'} of `module`, numpy on the host.
      head_params: the classification head's params, numpy
        ({'kernel': [D, C_padded * k]}).
    """

    config: ml_collections.ConfigDict
    workdir: str
    step: int
    module: Any
    variables: dict
    head_params: dict


def load_trained_model(config: ml_collections.ConfigDict, workdir: str) -> TrainedModel:
    """Restores a run's latest checkpoint once: model and head, no optimizer state.

    Args:
      config: the run's own config (run_config.evaluation_config(cli, workdir)).
      workdir: the run's workdir.

    Returns:
      The TrainedModel, its variables on the host (they load on any device
      count; extraction places them on its devices).

    Raises:
      FileNotFoundError: the workdir has no checkpoint.
    """
    stage = checkpointing.load_stage(workdir)
    variables = {"params": stage["params"]["model"], "batch_stats": stage["batch_stats"]["model"]}
    return TrainedModel(
        config,
        workdir,
        stage["step"],
        create_model(config.model),
        variables,
        stage["params"]["head"],
    )


def _encode_ids(ids: np.ndarray) -> np.ndarray:
    out = np.zeros((len(ids), _ID_BYTES), np.uint8)
    for i, image_id in enumerate(ids):
        raw = image_id.encode()
        if len(raw) > _ID_BYTES:
            raise ValueError(f"image id {image_id!r} is longer than {_ID_BYTES} bytes")
        out[i, : len(raw)] = np.frombuffer(raw, np.uint8)
    return out


def _decode_ids(encoded: np.ndarray) -> np.ndarray:
    return np.array([bytes(row).rstrip(b"\0").decode() for row in encoded])


def _gather(x: jax.Array) -> np.ndarray:
    """A batch-sharded global array as one host array (every process)."""
    if jax.process_count() == 1:
        return np.asarray(x)
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def _local_mesh(mesh) -> Any:
    """The mesh's devices of this process, as a 1-D data mesh."""
    local = [d for d in mesh.devices.flat if d.process_index == jax.process_index()]
    if not local:
        raise ValueError(f"the mesh has no device of process {jax.process_index()}")
    return sharding.create_mesh(local)


def _embed_views(model, flip: bool):
    """jit(variables, images uint8 [B,H,W,3]) -> [B, D] sum of unit view embeddings."""

    @jax.jit
    def embed(variables, images):
        views = [images, images[:, :, ::-1]] if flip else [images]
        total = 0.0
        for view in views:
            e = model.apply(variables, view).astype(jnp.float32)
            total = total + e / jnp.maximum(jnp.linalg.norm(e, axis=-1, keepdims=True), 1e-12)
        return total

    return embed


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


def _share_embeddings(
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
) -> dict[str, np.ndarray]:
    """One process's share of a split, embedded on its devices (aspect kept).

    Returns:
      {'ids': uint8 [n, 64], 'embeddings': float32 [n, D] unit rows,
      'labels': int64 [n] (-1 when unlabeled)} in the process's reading order.
    """
    index = input_pipeline.read_eval_index(
        data_dir, split, process_index=process_index, process_count=process_count
    )
    n = len(index.ids)
    probe = jax.ShapeDtypeStruct((local_mesh.devices.size, 32, 32, 3), jnp.uint8)
    dim = jax.eval_shape(embed, variables, probe).shape[-1]
    total = np.zeros((n, dim), np.float32)
    placement = sharding.batch_sharding(local_mesh)

    def finish(item):
        indices, out = item
        total[indices] += np.asarray(out)[: len(indices)]
        progress.update(len(indices))

    for scale in scales:
        sizes = input_pipeline.eval_image_sizes(
            index.heights,
            index.widths,
            resize=resize,
            image_size=image_size,
            scale=scale,
            multiple=size_multiple,
        )
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
        images = input_pipeline.create_sized_eval_dataset(
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
    total /= np.maximum(np.linalg.norm(total, axis=-1, keepdims=True), 1e-12)
    labels = index.labels if index.labels is not None else np.full(n, -1, np.int64)
    return {"ids": _encode_ids(index.ids), "embeddings": total, "labels": labels}


def _file_order(shares: Sequence[dict[str, np.ndarray]], file_examples: Sequence[int]):
    """Every process's rows merged into the split's file order.

    Process q reads files q, q + P, ... (input_pipeline._process_files), so
    file f's rows are the next file_examples[f] rows of process f % P.
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


def _allgather_shares(share: dict[str, np.ndarray], counts: Sequence[int]):
    """Every process's share on every process (one collective; equal shapes)."""
    if jax.process_count() == 1:
        return [share]
    rows = max(counts)
    padded = {
        k: np.concatenate([v, np.zeros((rows - len(v), *v.shape[1:]), v.dtype)])
        for k, v in share.items()
    }
    stacked = jax.tree.map(np.asarray, multihost_utils.process_allgather(padded, tiled=False))
    return [{k: v[q, : counts[q]] for k, v in stacked.items()} for q in range(len(counts))]


def _extract_by_shape(embed, variables, data_dir: str, split: str, **kwargs) -> Embeddings:
    """The aspect-kept extraction: each process embeds its share, then one gather."""
    process_index, process_count = jax.process_index(), jax.process_count()
    share = _share_embeddings(
        embed,
        variables,
        data_dir,
        split,
        process_index=process_index,
        process_count=process_count,
        **kwargs,
    )
    info = data_format.read_split_info(data_dir, split)
    counts = [sum(info.file_examples[q::process_count]) for q in range(process_count)]
    merged = _file_order(_allgather_shares(share, counts), info.file_examples)
    return Embeddings(
        _decode_ids(merged["ids"]),
        merged["embeddings"].astype(np.float32),
        merged["labels"].astype(np.int64),
    )


def extract(
    model: TrainedModel,
    split: str,
    *,
    data_dir: str | None = None,
    scales: Sequence[float] = (1.0,),
    flip: bool = False,
    image_size: int | None = None,
    batch_size: int | None = None,
    mesh: Any = None,
    resize: str = "square",
    size_multiple: int = 1,
) -> Embeddings:
    """Embeds every image of a split with a restored model.

    Args:
      model: the run's model (load_trained_model), restored once by the caller.
      split: 'index', 'test', 'train' or 'val'.
      data_dir: the data folder holding the split (default
        model.config.data_dir).
      scales: image-size multipliers to average over (e.g. 1/sqrt2, 1, sqrt2).
      flip: also average the left-right flipped view.
      image_size: base image side (default: the run's image_size); unused
        by resize='native'.
      batch_size: global batch (default: the run's eval or training batch),
        a multiple of the device count.
      mesh: the device mesh (default all devices).
      resize: 'square' (image_size * scale squared), 'longer_side' or
        'native' (aspect ratio kept; see input_pipeline.eval_image_sizes).
      size_multiple: aspect-kept modes: sides rounded to a multiple of it
        (fewer distinct shapes to compile); 1 is exact.

    Returns:
      Embeddings in the split's file order, L2-normalised.

    Raises:
      ValueError: an empty scale list, a non-positive scale, an unknown resize
        mode, a size_multiple below 1, or a batch that does not divide over
        the devices.
    """
    if not scales or min(scales) <= 0:
        raise ValueError(f"scales={tuple(scales)}: need one or more positive scales")
    if resize not in input_pipeline.RESIZE_MODES:
        raise ValueError(f"resize={resize!r}: expected one of {input_pipeline.RESIZE_MODES}")
    if not size_multiple >= 1 or int(size_multiple) != size_multiple:
        raise ValueError(f"size_multiple={size_multiple!r}: must be a positive integer")
    config = model.config
    data_dir = data_dir or config.data_dir
    mesh = mesh or sharding.create_mesh()
    image_size = image_size or config.image_size
    batch_size = batch_size or config.get("val", {}).get("batch_size") or config.batch_size
    # Aspect-kept programs run on this process's devices only (see above).
    run_mesh = mesh if resize == "square" else _local_mesh(mesh)
    local_rows = sharding.local_batch_size(batch_size, mesh)
    variables = jax.device_put(model.variables, sharding.replicated_sharding(run_mesh))
    embed = _embed_views(model.module, flip)
    if resize != "square":
        return _extract_by_shape(
            embed,
            variables,
            data_dir,
            split,
            scales=tuple(scales),
            image_size=image_size,
            resize=resize,
            size_multiple=int(size_multiple),
            local_rows=local_rows,
            local_mesh=run_mesh,
        )

    total, ids, labels, mask = None, None, None, None
    for scale in scales:
        size = max(int(round(image_size * scale)), 1)
        batches, num_steps = input_pipeline.eval_iterator(
            data_dir, split, mesh=mesh, global_batch_size=batch_size, image_size=size
        )
        parts, id_parts, label_parts, mask_parts = [], [], [], []
        progress = tqdm.tqdm(
            batches,
            total=num_steps,
            desc=f"embedding {split} @{size}px",
            unit="batch",
            disable=jax.process_index() != 0,
        )
        for batch, batch_ids in progress:
            parts.append(_gather(embed(variables, batch["image"])))
            mask_parts.append(_gather(batch["mask"]))
            id_parts.append(_gather(sharding.host_local_to_global(_encode_ids(batch_ids), mesh)))
            if "label" in batch:
                label_parts.append(_gather(batch["label"]))
        scale_total = np.concatenate(parts)
        total = scale_total if total is None else total + scale_total
        mask = np.concatenate(mask_parts)
        ids = _decode_ids(np.concatenate(id_parts))
        labels = np.concatenate(label_parts) if label_parts else np.full(len(mask), -1)

    embeddings = total[mask]
    embeddings /= np.maximum(np.linalg.norm(embeddings, axis=-1, keepdims=True), 1e-12)
    return Embeddings(ids[mask], embeddings.astype(np.float32), labels[mask].astype(np.int64))
