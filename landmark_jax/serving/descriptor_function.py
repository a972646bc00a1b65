"""The descriptor a run (or an ensemble) gives an image, as one exportable function.

What `evaluate` computes for an image, split into the part that needs the
image's size (TensorFlow: the resize of every member and scale) and the
numeric part (JAX: the models):

  * `member_inputs` (TF): for each member and extraction scale, the image
    resized as extraction resizes it (sized_eval_input.tf_eval_image_size, then
    input_pipeline's bilinear `resize_image` and uint8 rounding `to_uint8`);
  * `describe` (JAX): for each member, the unit descriptors of its views
    (flip) summed over its scales and L2-normalised (extract.embed_views, as
    `extract.extract`), times the member's weight, concatenated over the
    members (ensemble.combine_embeddings: GLR2020's export). SuperGlobal's
    pooling options of the evaluation config (eval.gem_plus, ...) come with
    the extraction's: the model is built with them
    (superglobal_extraction.with_options) and Scale-GeM combines the scales
    in place of the sum, as `extract.extract` does.

Together they give the row `evaluate` embeds the image as, to float
rounding. Models are rebuilt with XLA's convolutions (`conv_lowering='xla'`):
the same weights and results as im2col, and a program that any platform
lowers.

Where this differs from GLR2020's released export (export_model.ipynb): that
notebook fed the resized float pixels to the network; here the resized image
is rounded to uint8 first, because this project trains and evaluates on
uint8 images (input_pipeline), and the export must equal its evaluation.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tensorflow as tf

from landmark_jax.data import input_pipeline, sized_eval_input
from landmark_jax.models import layers, superglobal_pooling
from landmark_jax.models.factory import create_model
from landmark_jax.retrieval import ensemble, extract, superglobal_extraction
from landmark_jax.runtime import file_io


@dataclasses.dataclass(frozen=True)
class ExportedMember:
    """One model of an exported descriptor, with how its inputs are made.

    Attributes:
      workdir: the run it was restored from.
      step: its checkpoint step.
      module: the embedding model (XLA's convolutions).
      variables: {'params', 'batch_stats'} as numpy (no classification head).
      weight: the multiplier of its normalised descriptor (1.0 for one run).
      image_size: the base side its images are resized to.
      scales: the extraction scales whose descriptors are averaged.
      flip: whether the left-right flipped view is averaged too.
      resize: 'square', 'longer_side' or 'native' (sized_eval_input).
      size_multiple: aspect-kept modes: sides rounded to a multiple of it.
      descriptor: 'embedding' or 'pooled' (models.DESCRIPTORS).
      min_side: the smallest side the model takes (extract.min_image_side).
      model_config: the resolved model config it was built from.
      superglobal: SuperGlobal's pooling options
        (superglobal_extraction.options_from_config), already in `module`
        but Scale-GeM's; part of the identity only when on, so a member
        without them keeps the identity it had before they existed.
    """

    workdir: str
    step: int
    module: Any
    variables: dict
    weight: float
    image_size: int
    scales: tuple[float, ...]
    flip: bool
    resize: str
    size_multiple: int
    descriptor: str
    min_side: int
    model_config: dict
    superglobal: dict

    def identity(self) -> dict[str, Any]:
        """What defines this member's descriptor, as JSON-ready data."""
        identity = {
            "workdir": file_io.absolute(self.workdir),
            "step": self.step,
            "weight": self.weight,
            "image_size": self.image_size,
            "scales": list(self.scales),
            "flip": self.flip,
            "resize": self.resize,
            "size_multiple": self.size_multiple,
            "descriptor": self.descriptor,
            "model": self.model_config,
        }
        if not superglobal_extraction.is_off(self.superglobal):
            identity["superglobal"] = self.superglobal
        return identity


def exported_member(
    model: extract.TrainedModel, member: ensemble.EnsembleMember, config: ml_collections.ConfigDict
) -> ExportedMember:
    """A restored model with the extraction settings `evaluate` would use for it.

    Args:
      model: the restored run (restored_runs.restore_members).
      member: its ensemble entry (weight, image size).
      config: the evaluation config (its eval block: scales, flip, resize).
    """
    options = extract.extraction_options(config, model, member.image_size)
    model_config = {**dict(model.config.model), "conv_lowering": "xla"}
    model_config = ml_collections.ConfigDict(model_config).to_dict()
    superglobal = dict(options["superglobal"])
    module = superglobal_extraction.with_options(create_model(model_config), superglobal)
    return ExportedMember(
        workdir=model.workdir,
        step=int(model.step),
        module=module,
        variables=model.variables,
        weight=float(member.weight),
        image_size=int(options["image_size"]),
        scales=tuple(float(s) for s in options["scales"]),
        flip=bool(options["flip"]),
        resize=options["resize"],
        size_multiple=int(options["size_multiple"]),
        descriptor=options["descriptor"],
        min_side=extract.min_image_side(module),
        model_config=model_config,
        superglobal=superglobal,
    )


def input_sizes(member: ExportedMember) -> list[dict[str, Any]]:
    """How each of a member's inputs is sized, per scale, as JSON-ready data:
    {'scale', 'size': [h, w]} for a square resize, else {'scale', 'rule'}."""
    out = []
    for scale in member.scales:
        if member.resize == "square":
            ((side, _),) = sized_eval_input.eval_image_sizes(
                np.ones(1),
                np.ones(1),
                resize="square",
                image_size=member.image_size,
                scale=scale,
                min_side=member.min_side,
            )
            out.append({"scale": scale, "size": [int(side), int(side)]})
        else:
            rule = {
                "resize": member.resize,
                "image_size": member.image_size,
                "size_multiple": member.size_multiple,
                "min_side": member.min_side,
            }
            out.append({"scale": scale, "rule": rule})
    return out


def member_inputs(images: tf.Tensor, members: Sequence[ExportedMember]) -> list[list[tf.Tensor]]:
    """The resized images `describe` takes, from a batch of one size (TF).

    Args:
      images: uint8 [B, H, W, 3], every image of the batch of one size.
      members: the exported members.

    Returns:
      One list per member of uint8 [B, h, w, 3] images, one per scale.
    """
    shape = tf.shape(images)
    out = []
    for member in members:
        per_scale = []
        for scale in member.scales:
            size = sized_eval_input.tf_eval_image_size(
                shape[1],
                shape[2],
                resize=member.resize,
                image_size=member.image_size,
                scale=scale,
                multiple=member.size_multiple,
                min_side=member.min_side,
            )
            resized = input_pipeline.resize_image(images, size)
            per_scale.append(input_pipeline.to_uint8(resized))
        out.append(per_scale)
    return out


def input_sides(members: Sequence[ExportedMember]) -> list[list[tuple[int | str, int | str]]]:
    """The (height, width) of each of `describe`'s images, per member and scale:
    the static side of a square resize, else a symbol ('h0_1': member 0, scale 1)."""
    return [
        [
            tuple(size["size"]) if "size" in size else (f"h{m}_{s}", f"w{m}_{s}")
            for s, size in enumerate(input_sizes(member))
        ]
        for m, member in enumerate(members)
    ]


def polymorphic_shapes(members: Sequence[ExportedMember]) -> list[list[str]]:
    """`input_sides` in jax2tf's polymorphic notation, 'b' the batch."""
    return [[f"(b, {h}, {w}, 3)" for h, w in sides] for sides in input_sides(members)]


def symbolic_image_specs(members: Sequence[ExportedMember]) -> list[list[jax.ShapeDtypeStruct]]:
    """`input_sides` as jax.export's abstract uint8 images, symbols in one scope."""
    sides = input_sides(members)
    names = ["b"] + [d for per_scale in sides for hw in per_scale for d in hw if isinstance(d, str)]
    dims = jax.export.symbolic_shape(", ".join(names), scope=jax.export.SymbolicScope())
    symbol = dict(zip(names, dims, strict=True))
    return [
        [
            jax.ShapeDtypeStruct((symbol["b"], *(symbol.get(d, d) for d in hw), 3), np.uint8)
            for hw in per_scale
        ]
        for per_scale in sides
    ]


def describe_function(members: Sequence[ExportedMember]):
    """(variables, images) -> float32 [B, D]: the members' weighted descriptors.

    Args:
      members: the exported members.

    Returns:
      (describe, variables): `describe(variables, images)` takes the members'
      variables (a list, as returned) and `member_inputs`' nested images.
    """
    embeds = [extract.embed_views(m.module, m.flip, m.descriptor) for m in members]

    def describe(variables, images):
        parts = []
        for member, embed, member_variables, per_scale in zip(
            members, embeds, variables, images, strict=True
        ):
            sums = [embed(member_variables, image) for image in per_scale]
            if superglobal_extraction.scale_gem(member.superglobal):
                total = superglobal_pooling.scale_gem(jnp.stack(sums))
            else:
                total = sum(sums)
            parts.append(layers.l2_normalize_rows(total, jnp) * member.weight)
        return jnp.concatenate(parts, axis=-1)

    return describe, [m.variables for m in members]


def descriptor_dim(members: Sequence[ExportedMember]) -> int:
    """The exported descriptor's dimension (the members' summed), without running them."""
    describe, variables = describe_function(members)
    images = [
        [
            jax.ShapeDtypeStruct((1, *_probe_size(member, s), 3), np.uint8)
            for s in range(len(member.scales))
        ]
        for member in members
    ]
    return int(jax.eval_shape(describe, variables, images).shape[-1])


def _probe_size(member: ExportedMember, scale_index: int) -> tuple[int, int]:
    size = input_sizes(member)[scale_index].get("size")
    side = max(member.image_size, member.min_side, 32)
    return tuple(size) if size else (side, side)
