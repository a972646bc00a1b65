"""Embeddings of a split from a restored model, sharded over all devices.

A run is restored once (`restored_runs.load_trained_model`: its config.json's model, the
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

`resize='square'` (the default, GLR2020) squashes every image to a square
and runs one program over all devices. `'longer_side'` and `'native'` keep
the aspect ratio (sized_eval_input.eval_image_sizes): images then differ in
shape and are batched by shape, each process on its own devices, with one
gather of the embeddings at the end (shape_buckets.py). In every mode a side
below the model's minimum (`min_image_side`: 32 px for an EfficientNet with
Keras's dynamic padding, none otherwise) is raised to it.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import zipfile
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tqdm
from jax.experimental import multihost_utils

from landmark_jax.data import data_format, input_pipeline, sized_eval_input
from landmark_jax.models import layers, superglobal_pooling
from landmark_jax.retrieval import shape_buckets, superglobal_extraction
from landmark_jax.runtime import file_io, sharding

# The folder of a workdir that evaluation and the Revisited benchmark write
# their embeddings and results to.
EVAL_DIR = "eval"
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
        """The embeddings `save` wrote to `path`.

        Raises:
          CacheUnreadable: the file is not such an npz (cut short, another
            format, pickled objects, keys or shapes missing), named.
        """
        # np.load never unpickles here (allow_pickle stays False), so a planted
        # object array is refused, not run.
        try:
            f = file_io.load_npz(path)
            emb = cls(f["ids"], f["embeddings"], f["labels"], json.loads(str(f["settings"])))
        except (zipfile.BadZipFile, ValueError, KeyError, EOFError) as e:
            raise CacheUnreadable(f"{path}: {type(e).__name__}: {e}") from e
        n = len(emb.ids)
        if emb.embeddings.ndim != 2 or len(emb.embeddings) != n or len(emb.labels) != n:
            raise CacheUnreadable(
                f"{path}: ids {emb.ids.shape}, embeddings {emb.embeddings.shape} and labels "
                f"{emb.labels.shape} do not describe the same images"
            )
        return emb


class CacheUnreadable(ValueError):
    """An embeddings file that cannot be read back (named in the message)."""


def load_cache(path: str) -> Embeddings | None:
    """A cache of embeddings written by `Embeddings.save`, or None when unusable.

    The cache is the program's own file, re-made from the model and the data
    at will: a file that cannot be read is logged with its path and the
    problem, and the caller extracts again and overwrites it (nothing of the
    user's is lost). Read errors of the storage itself propagate.

    Args:
      path: the cache file (it exists).

    Returns:
      The cached embeddings, or None when the file is unreadable.
    """
    try:
        return Embeddings.load(path)
    except CacheUnreadable as e:
        logging.warning("unreadable embedding cache %s; extracting again and overwriting it", e)
        return None


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


@functools.lru_cache(maxsize=16)
def embed_views(model, flip: bool, descriptor: str = "embedding"):
    """jit(variables, images uint8 [B,H,W,3]) -> [B, D] sum of unit view descriptors.

    descriptor 'embedding' is the model's output; 'pooled' the pooled
    features it sows before its neck. One jitted function per (module, flip,
    descriptor): modules compare by value, so the trainer's validation steps
    and an evaluation's repeated extractions reuse the compiled programs.
    """

    def describe(variables, view):
        if descriptor == "embedding":
            return model.apply(variables, view)
        _, state = model.apply(variables, view, mutable=["intermediates"])
        return state["intermediates"]["pooled"][0]

    @jax.jit
    def embed(variables, images):
        views = [images, images[:, :, ::-1]] if flip else [images]
        total = 0.0
        for view in views:
            e = describe(variables, view).astype(jnp.float32)
            total = total + layers.l2_normalize_rows(e, jnp)
        return total

    return embed


def min_image_side(module: Any) -> int:
    """The smallest image side a model gives a descriptor for.

    Keras's EfficientNet built without a fixed input shape, which is what
    converted Keras weights record (`padding='keras_dynamic'`), pads
    (k//2 - 1, k//2) = k - 2 before each stride-2 k x k convolution, so each
    takes a side n to floor(n / 2): the stride-32 map of a side under
    2**(stride-2 convolutions) = 32 px is empty, and its pooled descriptor
    NaN (XLA's convolution) or an error (im2col), as in Keras itself. TF SAME
    padding and the ResNets' explicit padding take n to ceil(n / 2), so
    every side of at least 1 px gives a descriptor, as in the PyTorch
    ResNets DOLG's evaler/infer.py and cirtorch's extract_ms evaluate with
    (neither has a minimum nor upscales: DOLG scales by s from the native
    size, cirtorch only shrinks to imsize).

    Args:
      module: a model of factory.create_model (its `backbone` attribute).

    Returns:
      2**(stride-2 convolutions) (32, or 16 with stem_stride 1) for an
      EfficientNet with 'keras_dynamic' padding; 1 for any other model.
    """
    backbone = getattr(module, "backbone", None)
    if getattr(backbone, "padding", None) != "keras_dynamic":
        return 1
    halvings = int(backbone.stem_stride == 2)
    halvings += sum(spec.strides == 2 for spec in backbone.block_specs())
    return 2**halvings


def _extract_by_shape(embed, variables, data_dir: str, split: str, **kwargs) -> Embeddings:
    """The aspect-kept extraction: each process embeds its share, then one gather."""
    process_index, process_count = jax.process_index(), jax.process_count()
    share = shape_buckets.share_embeddings(
        embed,
        variables,
        data_dir,
        split,
        process_index=process_index,
        process_count=process_count,
        **kwargs,
    )
    share = {**share, "ids": _encode_ids(share["ids"])}  # fixed width for the gather
    info = data_format.read_split_info(data_dir, split)
    counts = [sum(info.file_examples[q::process_count]) for q in range(process_count)]
    shares = shape_buckets.allgather_shares(share, counts)
    merged = shape_buckets.file_order(shares, info.file_examples)
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
    descriptor: str | None = None,
    superglobal: Mapping[str, Any] | None = None,
) -> Embeddings:
    """Embeds every image of a split with a restored model.

    Args:
      model: the run's model (restored_runs.load_trained_model), restored once by the caller.
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
        'native' (aspect ratio kept; see sized_eval_input.eval_image_sizes).
      size_multiple: aspect-kept modes: sides rounded to a multiple of it
        (fewer distinct shapes to compile); 1 is exact.
      descriptor: 'embedding' or 'pooled' (models.DESCRIPTORS); None: the
        run's model.descriptor.
      superglobal: SuperGlobal's pooling options
        (superglobal_extraction.options_from_config; None: off): GeM+,
        Regional-GeM and ReLU+ in the model, and with Scale-GeM the scales
        combined by the maximum of their unit descriptors instead of summed.

    A side that any mode sizes below the model's minimum (`min_image_side`:
    32 px for an EfficientNet with Keras's dynamic padding, 1 for every
    other model) is raised to it, logged; the reference code has no such
    minimum because its ResNets need none (see min_image_side).

    Returns:
      Embeddings in the split's file order, L2-normalised.

    Raises:
      ValueError: an empty scale list, a non-positive scale, an unknown resize
        mode, a size_multiple below 1, a batch that does not divide over
        the devices, or a SuperGlobal option the model cannot take (named).
    """
    if not scales or min(scales) <= 0:
        raise ValueError(f"scales={tuple(scales)}: need one or more positive scales")
    if resize not in sized_eval_input.RESIZE_MODES:
        raise ValueError(f"resize={resize!r}: expected one of {sized_eval_input.RESIZE_MODES}")
    if not size_multiple >= 1 or int(size_multiple) != size_multiple:
        raise ValueError(f"size_multiple={size_multiple!r}: must be a positive integer")
    config = model.config
    data_dir = data_dir or config.data_dir
    mesh = mesh or sharding.create_mesh()
    image_size = image_size or config.image_size
    batch_size = batch_size or config.val.batch_size or config.batch_size
    # Aspect-kept programs run on this process's devices only (shape_buckets).
    run_mesh = mesh if resize == "square" else shape_buckets.process_mesh(mesh)
    local_rows = sharding.local_batch_size(batch_size, mesh)
    variables = sharding.replicate(model.variables, run_mesh)
    module = superglobal_extraction.with_options(model.module, superglobal)
    scale_gem = superglobal_extraction.scale_gem(superglobal)
    embed = embed_views(module, flip, descriptor or config.model.descriptor)
    # Every path sizes images to at least the model's minimum side, whatever
    # the lowering (eval_image_sizes' min_side).
    min_side = min_image_side(module)
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
            min_side=min_side,
            scale_gem=scale_gem,
        )

    # Where each of this process's rows stands in the split's file order: it
    # reads files q, q + P, ... front to back (input_pipeline.process_files),
    # and the gathered global batches interleave the processes' rows.
    info = data_format.read_split_info(data_dir, split)
    q, count = jax.process_index(), jax.process_count()
    starts = np.cumsum([0, *info.file_examples])
    reading_order = np.concatenate(
        [np.arange(starts[f], starts[f + 1]) for f in range(q, len(info.files), count)]
        or [np.zeros(0, np.int64)]
    )
    total, ids, labels, mask, positions = None, None, None, None, None
    per_scale = []  # Scale-GeM's inputs: each scale's sums of unit views
    for scale in scales:
        size = max(int(round(image_size * scale)), min_side)
        if size == min_side > int(round(image_size * scale)):
            logging.warning(
                "%s @ scale %g: %d px is under the model's minimum; embedding at %d px",
                split,
                scale,
                int(round(image_size * scale)),
                min_side,
            )
        batches, num_steps = input_pipeline.eval_iterator(
            data_dir, split, mesh=mesh, global_batch_size=batch_size, image_size=size
        )
        parts, id_parts, label_parts, mask_parts, position_parts = [], [], [], [], []
        read = 0
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
            local = np.full(len(batch_ids), -1, np.int32)  # -1 on padding rows ('' ids)
            real = np.asarray([len(i) > 0 for i in batch_ids], bool)
            local[real] = reading_order[read : read + int(real.sum())]
            read += int(real.sum())
            position_parts.append(_gather(sharding.host_local_to_global(local, mesh)))
            if "label" in batch:
                label_parts.append(_gather(batch["label"]))
        scale_total = np.concatenate(parts)
        if scale_gem:
            per_scale.append(scale_total)
        else:
            total = scale_total if total is None else total + scale_total
        mask = np.concatenate(mask_parts)
        ids = _decode_ids(np.concatenate(id_parts))
        labels = np.concatenate(label_parts) if label_parts else np.full(len(mask), -1)
        positions = np.concatenate(position_parts)

    if scale_gem:
        total = superglobal_pooling.scale_gem(np.stack(per_scale), xp=np)
    order = np.argsort(positions[mask], kind="stable")  # file order, whatever the processes
    embeddings = layers.l2_normalize_rows(total[mask][order])
    return Embeddings(
        ids[mask][order], embeddings.astype(np.float32), labels[mask][order].astype(np.int64)
    )


def extraction_options(
    config: ml_collections.ConfigDict, model: TrainedModel, image_size: int | None = None
) -> dict[str, Any]:
    """How an evaluation config's eval.* says to extract a model's descriptors.

    Args:
      config: the evaluation config (its `eval` block).
      model: the run (its image size and model.descriptor).
      image_size: an ensemble member's own size (None: eval.image_size, else
        the run's).

    Returns:
      Keyword arguments of `extract`, SuperGlobal's options among them.
    """
    ec = config.eval
    return {
        "scales": tuple(ec.scales),
        "flip": bool(ec.flip),
        "image_size": image_size or ec.image_size or model.config.image_size,
        "resize": ec.resize,
        "size_multiple": int(ec.size_multiple),
        "descriptor": model.config.model.descriptor,
        "superglobal": superglobal_extraction.options_from_config(config),
    }
