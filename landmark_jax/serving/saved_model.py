"""`export(config, workdir, output)`: a run or an ensemble as a TF SavedModel and a jax.export.

The SavedModel is the one GLR2020 was scored with (the winners'
export_model.ipynb; the competition ran it on every index and test image
and ranked by Euclidean kNN, k = 100):

    serving_default(input_image: uint8 [H, W, 3]) -> {'global_descriptor': float32 [D]}
    serving_batch(input_images: uint8 [B, H, W, 3]) -> {'global_descriptor': float32 [B, D]}

`serving_batch` takes a batch of images of one size (TensorFlow Serving's
batched requests); both resize inside (descriptor_function.member_inputs),
so an image of any size goes in as decoded. There is no classification head
in it (GLR2021's 203,094-class head is 400 MB that a descriptor never uses).

orbax-export writes it (`JaxModule` converts the JAX function through
jax2tf's native serialisation: StableHLO lowered for CPU, CUDA and TPU,
the parameters as TF variables). Beside it, `jax_export/` holds the same
numeric function serialised with `jax.export` and its parameters, for JAX
users without this package (export_info.json says what each input is).

Output: a local or gs:// folder that must not exist; with overwrite=True an
existing one is moved aside (its new name logged and returned), never deleted.
The export is written to a staging folder and moved into place whole.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
import tensorflow as tf

from landmark_jax.retrieval import restored_runs
from landmark_jax.runtime import file_io
from landmark_jax.serving import descriptor_function

# The signatures' names and tensors (GLR2020's for serving_default).
SIGNATURE = "serving_default"
BATCH_SIGNATURE = "serving_batch"
INPUT = "input_image"
BATCH_INPUT = "input_images"
OUTPUT = "global_descriptor"
# What the export writes beside the SavedModel.
INFO_FILE = "export_info.json"
JAX_DIR = "jax_export"
JAX_FUNCTION = "describe.jax_exported"
JAX_PARAMS = "params.npz"
# Where the exported programs run: jax2tf and jax.export lower for each.
PLATFORMS = ("cpu", "cuda", "tpu")


def export(
    config: ml_collections.ConfigDict,
    workdir: str | None,
    output: str,
    *,
    overwrite: bool = False,
    expected_dim: int | None = None,
) -> dict[str, Any]:
    """Exports a run (or config.eval.ensemble's members) to `output`.

    Args:
      config: the evaluation config: eval.* says how to extract (image size,
        scales, flip, resize) and eval.ensemble the members; the models come
        from each workdir's config.json.
      workdir: the run (None when config.eval.ensemble lists the members).
      output: the folder to write (local or gs://); it must not exist.
      overwrite: move an existing `output` aside instead of refusing.
      expected_dim: the descriptor dimension the export must have (e.g. 2048
        for GLR2020's ensemble); None: whatever the members give.

    Returns:
      The export's info (export_info.json): its descriptor dimension,
      members, signatures, where it was written and where an older export
      was moved.

    Raises:
      FileExistsError: `output` exists and overwrite is False.
      FileNotFoundError: a member's workdir, config.json or checkpoint is
        missing (named).
      ValueError: the descriptor dimension differs from expected_dim, or a
        bad ensemble entry.
    """
    output = output.rstrip("/")
    if file_io.exists(output) and not overwrite:
        raise FileExistsError(
            f"{output} exists: choose another --output, or pass --overwrite to move it aside"
        )
    members, models = restored_runs.restore_members(config, workdir, purpose="nothing to export")
    exported = [
        descriptor_function.exported_member(model, member, config)
        for member, model in zip(members, models, strict=True)
    ]
    dim = descriptor_function.descriptor_dim(exported)
    if expected_dim is not None and dim != expected_dim:
        parts = " + ".join(
            f"{m.workdir}: {descriptor_function.descriptor_dim([m])} ({m.descriptor})"
            for m in exported
        )
        raise ValueError(
            f"--descriptor_dim={expected_dim}, but the model(s) give {dim}-d descriptors "
            f"({parts}); change model.embedding_dim or model.descriptor when training, "
            "or the ensemble's members"
        )
    info = {
        "format": "landmark_jax export 1",
        "descriptor_dim": dim,
        "members": [m.identity() for m in exported],
        "signatures": {
            SIGNATURE: {
                "inputs": {INPUT: "uint8 [H, W, 3]"},
                "outputs": {OUTPUT: f"float32 [{dim}]"},
            },
            BATCH_SIGNATURE: {
                "inputs": {BATCH_INPUT: "uint8 [B, H, W, 3], one size"},
                "outputs": {OUTPUT: f"float32 [B, {dim}]"},
            },
        },
        "jax_export": {
            "function": f"{JAX_DIR}/{JAX_FUNCTION}",
            "params": f"{JAX_DIR}/{JAX_PARAMS} (arrays '00000', '00001', ... in call order)",
            "call": "describe(params list, images) -> float32 [B, D]",
            "images": [descriptor_function.input_sizes(m) for m in exported],
        },
    }
    staging_root = _staging_root(output)
    staging = os.path.join(staging_root, "export")
    try:
        _write_saved_model(exported, staging)
        _write_jax_export(exported, os.path.join(staging, JAX_DIR))
        with open(os.path.join(staging, INFO_FILE), "w") as f:
            json.dump(info, f, indent=2)
        if file_io.exists(output):
            stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
            aside = f"{output}.replaced-{stamp}"
            file_io.move_folder(output, aside)
            logging.warning("moved the existing %s aside to %s", output, aside)
            info["moved_aside"] = aside
        # saved_model.pb last: a copy cut short does not read as a SavedModel.
        file_io.move_folder(staging, output, last=("saved_model.pb",))
    finally:
        if os.path.isdir(staging_root):
            shutil.rmtree(staging_root, ignore_errors=True)  # our own staging copy
    info["output"] = output
    return info


def _staging_root(output: str) -> str:
    """A fresh folder to write the export into: beside a local output (one
    rename into place), in the system's temp folder for a bucket."""
    if file_io.is_url(output):
        return tempfile.mkdtemp(prefix="landmark_jax_export-")
    parent = os.path.dirname(os.path.abspath(output))
    os.makedirs(parent, exist_ok=True)
    return tempfile.mkdtemp(prefix=f".{os.path.basename(output)}.staging-", dir=parent)


def _write_saved_model(members: Sequence[descriptor_function.ExportedMember], path: str) -> None:
    """The SavedModel through orbax-export, with both signatures."""
    from orbax.export import ExportManager, JaxModule, ServingConfig

    describe, variables = descriptor_function.describe_function(members)
    module = JaxModule(
        variables,
        describe,
        input_polymorphic_shape=descriptor_function.polymorphic_shapes(members),
        jax2tf_kwargs={"native_serialization_platforms": PLATFORMS},
    )

    def one_image(image):
        # A batch of one whose size TF does not know statically: both
        # signatures then call the converted function with the same shapes,
        # and TF traces it (and jax2tf converts it) once, not twice.
        images = tf.raw_ops.PlaceholderWithDefault(
            input=image[tf.newaxis], shape=[None, None, None, 3]
        )
        return descriptor_function.member_inputs(images, members)

    def batch(images):
        return descriptor_function.member_inputs(images, members)

    configs = [
        ServingConfig(
            SIGNATURE,
            input_signature=[tf.TensorSpec([None, None, 3], tf.uint8, name=INPUT)],
            tf_preprocessor=one_image,
            tf_postprocessor=lambda out: {OUTPUT: out[0]},
        ),
        ServingConfig(
            BATCH_SIGNATURE,
            input_signature=[tf.TensorSpec([None, None, None, 3], tf.uint8, name=BATCH_INPUT)],
            tf_preprocessor=batch,
            tf_postprocessor=lambda out: {OUTPUT: out},
        ),
    ]
    ExportManager(module, configs).save(path)


def _write_jax_export(members: Sequence[descriptor_function.ExportedMember], path: str) -> None:
    """The numeric function as jax.export bytes, its parameters as numbered arrays."""
    describe, variables = descriptor_function.describe_function(members)
    leaves, treedef = jax.tree.flatten(variables)

    def describe_flat(params, images):
        return describe(jax.tree.unflatten(treedef, params), images)

    images = descriptor_function.symbolic_image_specs(members)
    params = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in leaves]
    exported = jax.export.export(jax.jit(describe_flat), platforms=PLATFORMS)(params, images)
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, JAX_FUNCTION), "wb") as f:
        f.write(exported.serialize())
    np.savez(
        os.path.join(path, JAX_PARAMS), **{f"{i:05d}": np.asarray(x) for i, x in enumerate(leaves)}
    )
