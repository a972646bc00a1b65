"""Embeddings of a split from a trained workdir, sharded over all devices.

Every image of the split is embedded exactly once (the eval pipeline pads the
last batch and masks it out), with optional flip and multi-scale averaging:
each view's embedding is L2-normalised, the views are averaged, and the mean
is normalised again (as the DOLG and cirtorch evaluation code do). Scales
re-read the images at round(image_size * scale), so a larger scale sees more
pixels of the original, not an upsampled copy. Results are written to
`<workdir>/eval/embeddings-<split>.npz` (ids, embeddings, labels) so search can
be re-run without the model.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tqdm
from jax.experimental import multihost_utils

from landmark_jax import checkpointing, input_pipeline, sharding
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
        os.makedirs(os.path.dirname(path), exist_ok=True)
        np.savez(
            path,
            ids=self.ids,
            embeddings=self.embeddings,
            labels=self.labels,
            settings=json.dumps(self.settings),
        )

    @classmethod
    def load(cls, path: str) -> Embeddings:
        with np.load(path) as f:
            return cls(f["ids"], f["embeddings"], f["labels"], json.loads(str(f["settings"])))


def load_model_variables(config: ml_collections.ConfigDict, workdir: str, mesh):
    """The workdir's model and its latest variables, replicated on the mesh.

    `config` is the workdir's own config (run_config.evaluation_config), whose
    resolved model block rebuilds the trained model, input convention included.

    Raises:
      FileNotFoundError: the workdir has no checkpoint.
    """
    model = create_model(config.model)
    stage = checkpointing.load_stage(workdir)
    variables = {"params": stage["params"]["model"], "batch_stats": stage["batch_stats"]["model"]}
    return model, jax.device_put(variables, sharding.replicated_sharding(mesh))


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


def extract(
    config: ml_collections.ConfigDict,
    workdir: str,
    split: str,
    *,
    scales: Sequence[float] = (1.0,),
    flip: bool = False,
    image_size: int | None = None,
    batch_size: int | None = None,
    mesh: Any = None,
) -> Embeddings:
    """Embeds every image of a split with the workdir's latest checkpoint.

    Args:
      config: the workdir's training config (model, data_dir).
      workdir: the training workdir.
      split: 'index', 'test', 'train' or 'val'.
      scales: image-size multipliers to average over (e.g. 1/sqrt2, 1, sqrt2).
      flip: also average the left-right flipped view.
      image_size: base image side (default config.image_size).
      batch_size: global batch (default config.batch_size), a multiple of
        the device count.
      mesh: the device mesh (default all devices).

    Returns:
      Embeddings in the split's file order, L2-normalised.

    Raises:
      ValueError: an empty scale list or a non-positive scale.
      FileNotFoundError: the workdir has no checkpoint.
    """
    if not scales or min(scales) <= 0:
        raise ValueError(f"scales={tuple(scales)}: need one or more positive scales")
    mesh = mesh or sharding.create_mesh()
    model, variables = load_model_variables(config, workdir, mesh)
    image_size = image_size or config.image_size
    batch_size = batch_size or config.eval_batch_size or config.batch_size

    @jax.jit
    def embed(variables, images):
        views = [images, images[:, :, ::-1]] if flip else [images]
        total = 0.0
        for view in views:
            e = model.apply(variables, view).astype(jnp.float32)
            total = total + e / jnp.maximum(jnp.linalg.norm(e, axis=-1, keepdims=True), 1e-12)
        return total

    total, ids, labels, mask = None, None, None, None
    for scale in scales:
        size = max(int(round(image_size * scale)), 1)
        batches, num_steps = input_pipeline.eval_iterator(
            config.data_dir, split, mesh=mesh, global_batch_size=batch_size, image_size=size
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
