"""The model a search embeds photos with: a trained run (or ensemble), or an exported SavedModel.

Both give the descriptor `evaluate` gives the same image:

  * a run, in this process: descriptor_function's `member_inputs` (the
    resize, in TF, as extraction does it) and a jitted `describe` (the
    models, flip and scales, the members' weighted concatenation);
  * a SavedModel of `python -m landmark_jax.export`: its `serving_default`
    signature, which wraps the same two functions.

A model carries its identity (its members' `ExportedMember.identity()`: run,
checkpoint step, weights, image size, scales, flip, resize, descriptor, the
model config; the SavedModel's export_info.json holds the same list), which
an index records so that an index is never searched, or extended, with
descriptors of another model.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
import tensorflow as tf

from landmark_jax.config_lib import base_config
from landmark_jax.retrieval import ensemble, extract, restored_runs
from landmark_jax.runtime import file_io
from landmark_jax.serving import descriptor_function, saved_model

# Photos per call of the in-process descriptor (padded up to it, so one
# program per input size serves every batch).
BATCH_SIZE = 16
# The eval.* keys an index keeps: how it is searched and how it recognises.
SEARCH_KEYS = (
    "k",
    "knn_backend",
    "recognition_k",
    "recognition_power",
    "non_landmark_k",
    "non_landmark_weight",
)


@dataclasses.dataclass
class PhotoModel:
    """A descriptor function for decoded photos, and what it is.

    Attributes:
      kind: 'run' (a workdir or an ensemble config) or 'saved_model'.
      location: the workdir or the SavedModel folder.
      identity: {'descriptor_dim', 'members'}: what defines the descriptor.
      search: the eval.* settings (SEARCH_KEYS) an index built with it uses.
      embed_photos: list of uint8 [H, W, 3] -> float32 [N, D].
      config: the evaluation config (runs only; for extracting a TFDS split).
      members, models: the ensemble members and restored runs (runs only).
    """

    kind: str
    location: str
    identity: dict[str, Any]
    search: dict[str, Any]
    embed_photos: Callable[[Sequence[np.ndarray]], np.ndarray]
    config: ml_collections.ConfigDict | None = None
    members: list[ensemble.EnsembleMember] | None = None
    models: list[extract.TrainedModel] | None = None

    def record(self) -> dict[str, Any]:
        """What an index keeps of its model: enough to rebuild it (from_record)
        and to tell another model from it (the identity)."""
        record = {"kind": self.kind, "location": self.location, "identity": self.identity}
        if self.config is not None:
            record["eval"] = json.loads(json.dumps(self.config.eval.to_dict(), default=list))
        return record

    @property
    def squared_norm(self) -> float:
        """Every descriptor's squared L2 norm: the members' weights squared, summed
        (unit rows per member, times its weight), which turns squared L2 into cosine."""
        return float(sum(m["weight"] ** 2 for m in self.identity["members"]))

    def describe(self) -> str:
        """A one-line name for messages: the model, its checkpoints and descriptor."""
        return describe_identity(self.kind, self.location, self.identity)


def describe_identity(kind: str, location: str, identity: dict[str, Any]) -> str:
    """'run DIR (step 6, 64-d embedding)' / 'SavedModel DIR (export of run ... )'."""
    runs = ", ".join(
        f"{m['workdir']} step {m['step']}"
        + (f" x{m['weight']:g}" if len(identity["members"]) > 1 else "")
        for m in identity["members"]
    )
    descriptors = "+".join(sorted({m["descriptor"] for m in identity["members"]}))
    what = "run" if kind == "run" else "SavedModel"
    return f"{what} {location} ({runs}; {identity['descriptor_dim']}-d {descriptors})"


def comparable_identity(identity: dict[str, Any]) -> Any:
    """An identity as plain JSON data with absolute workdirs: what two models
    must share to give the same descriptors (a SavedModel and its run do)."""
    plain = json.loads(json.dumps(identity))
    for member in plain["members"]:
        member["workdir"] = file_io.absolute(member["workdir"])
    return plain


def identity_differences(a: dict[str, Any], b: dict[str, Any], limit: int = 5) -> list[str]:
    """Where two identities differ, as 'members[0].flip: False != True' lines."""
    out: list[str] = []

    def walk(x, y, where):
        if isinstance(x, dict) and isinstance(y, dict):
            for key in sorted(set(x) | set(y)):
                walk(x.get(key), y.get(key), f"{where}.{key}" if where else str(key))
        elif isinstance(x, list) and isinstance(y, list) and len(x) == len(y):
            for i, (u, v) in enumerate(zip(x, y, strict=True)):
                walk(u, v, f"{where}[{i}]")
        elif x != y:
            out.append(f"{where}: {x!r} != {y!r}")

    walk(comparable_identity(a), comparable_identity(b), "")
    return out[:limit]


def _search_settings(ec: ml_collections.ConfigDict) -> dict[str, Any]:
    return {key: ec.get(key) for key in SEARCH_KEYS}


def from_run(workdir: str | None, config: ml_collections.ConfigDict | None = None) -> PhotoModel:
    """A trained run (or config.eval.ensemble's members) as a photo descriptor.

    Args:
      workdir: the run; None when `config` lists ensemble members.
      config: an evaluation config (its eval.* says how to extract); None:
        the run's own config.json, as `export` takes it.

    Raises:
      ValueError: neither a workdir nor a config.
      FileNotFoundError: a missing workdir, config.json or checkpoint (named).
    """
    from landmark_jax.workdir import run_config

    if config is None:
        if not workdir:
            raise ValueError("give --workdir=DIR, or --config=CONFIG naming ensemble members")
        config = run_config.read_run_config(workdir)
    members, models = restored_runs.restore_members(
        config, workdir, purpose="nothing to search with"
    )
    exported = [
        descriptor_function.exported_member(model, member, config)
        for member, model in zip(members, models, strict=True)
    ]
    describe, variables = descriptor_function.describe_function(exported)
    identity = {
        "descriptor_dim": descriptor_function.descriptor_dim(exported),
        "members": [m.identity() for m in exported],
    }
    embed = _batched_describe(jax.jit(describe), jax.device_put(variables), exported)
    location = workdir or ", ".join(m.workdir for m in members)
    return PhotoModel(
        "run", location, identity, _search_settings(config.eval), embed, config, members, models
    )


def from_record(record: dict[str, Any]) -> PhotoModel:
    """The model an index was built with, from its record (PhotoModel.record).

    A run is rebuilt from its (first member's) config.json with the eval
    block the index was built with: the same extraction settings, and an
    ensemble's members.

    Raises:
      FileNotFoundError: the run or the export is no longer where it was.
    """
    from landmark_jax.workdir import run_config

    if record["kind"] == "saved_model":
        return from_saved_model(record["location"])
    first = record["identity"]["members"][0]["workdir"]
    config = run_config.read_run_config(first)
    if record.get("eval") is not None:
        config.eval = ml_collections.ConfigDict(record["eval"])
    return from_run(None if config.eval.get("ensemble") else first, config)


def _batched_describe(describe, variables, exported) -> Callable:
    """Photos -> descriptors, batched by the shapes of their resized inputs.

    A square resize gives every photo the same inputs, so one program serves
    all; an aspect-kept resize batches photos whose inputs agree. Batches are
    padded to BATCH_SIZE rows (dropped after), so a shape compiles once.
    """

    def embed_photos(images: Sequence[np.ndarray]) -> np.ndarray:
        dim = None
        groups: dict[tuple, list[int]] = {}
        inputs = []
        for i, image in enumerate(images):
            nested = descriptor_function.member_inputs(tf.constant(image[np.newaxis]), exported)
            nested = [[x.numpy() for x in per_scale] for per_scale in nested]
            inputs.append(nested)
            shapes = tuple(x.shape for per_scale in nested for x in per_scale)
            groups.setdefault(shapes, []).append(i)
        out: list[np.ndarray | None] = [None] * len(images)
        for rows in groups.values():
            for start in range(0, len(rows), BATCH_SIZE):
                chunk = rows[start : start + BATCH_SIZE]
                batch = [
                    [_padded([inputs[r][m][s] for r in chunk]) for s in range(len(per_scale))]
                    for m, per_scale in enumerate(inputs[chunk[0]])
                ]
                result = np.asarray(describe(variables, batch))[: len(chunk)]
                for r, row in zip(chunk, result, strict=True):
                    out[r] = row
                dim = result.shape[1]
        if not images:
            return np.zeros((0, 0), np.float32)
        return np.stack(out).astype(np.float32).reshape(len(images), dim)

    return embed_photos


def _padded(rows: list[np.ndarray]) -> np.ndarray:
    """[n, h, w, 3] rows -> [BATCH_SIZE, h, w, 3], zero rows appended."""
    batch = np.concatenate(rows)
    pad = BATCH_SIZE - batch.shape[0]
    return np.concatenate([batch, np.zeros((pad, *batch.shape[1:]), batch.dtype)]) if pad else batch


def from_saved_model(path: str) -> PhotoModel:
    """An export of `python -m landmark_jax.export` as a photo descriptor.

    Its identity is export_info.json's (the members it was exported from);
    search settings are the defaults of eval.* (the export does not record
    the run's).

    Raises:
      FileNotFoundError: the folder has no export_info.json (not an export
        of this project) or no SavedModel.
    """
    path = path.rstrip("/")
    info_path = file_io.join(path, saved_model.INFO_FILE)
    if not file_io.exists(info_path):
        raise FileNotFoundError(
            f"{info_path} not found: --saved_model must be a folder written by "
            "python -m landmark_jax.export"
        )
    info = file_io.read_json(info_path)
    identity = {"descriptor_dim": info["descriptor_dim"], "members": info["members"]}
    loaded = tf.saved_model.load(path)

    def embed_photos(images: Sequence[np.ndarray]) -> np.ndarray:
        # Through `loaded` on every call: a signature alone does not keep the
        # loaded object (and its variables) alive.
        signature = loaded.signatures[saved_model.SIGNATURE]
        rows = [
            signature(**{saved_model.INPUT: tf.constant(image)})[saved_model.OUTPUT].numpy()
            for image in images
        ]
        return np.stack(rows).astype(np.float32) if rows else np.zeros((0, 0), np.float32)

    return PhotoModel(
        "saved_model", path, identity, _search_settings(base_config().eval), embed_photos
    )
