"""Which keras.applications architecture a Keras model or weights file holds.

Both a built Keras model and a weights file's layers reduce to a signature
(layer names and the shapes that fix the architecture: EfficientNet's stem
width, block names and top width; ResNet's stem width and blocks per stage),
compared with the signature of every registered Flax backbone. The converter
(keras_import.py) uses it to pick the backbone a model maps onto, and to
refuse a weights file written for another architecture than --arch.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn

from landmark_jax.models import backbones, efficientnet, resnet

# --arch -> keras.applications constructor.
KERAS_APPLICATIONS = {
    **{f"efficientnet_b{i}": f"EfficientNetB{i}" for i in range(8)},
    "resnet50": "ResNet50",
    "resnet101": "ResNet101",
}

LayerShapes = Mapping[str, Sequence[tuple[int, ...]]]


# ----------------------------------------------------------------------------
# Architecture detection, shared by Keras models and weights files.


def signature(layer_shapes: LayerShapes) -> tuple | None:
    """A hashable summary of the architecture, from layer names and shapes."""
    names = list(layer_shapes)
    if "stem_conv" in layer_shapes and "top_conv" in layer_shapes:
        blocks = {m.group(1) for n in names if (m := re.match(r"(block(\d+)[a-z])_", n))}
        order = sorted(blocks, key=lambda b: (int(re.sub(r"\D", "", b)), b[-1]))
        return (
            "efficientnet",
            layer_shapes["stem_conv"][0][-1],
            tuple(order),
            layer_shapes["top_conv"][0][-1],
        )
    if "conv1_conv" in layer_shapes:
        if any(n.endswith("_preact_bn") or n == "post_bn" for n in names):
            return ("resnet_v2",)
        counts: dict[int, int] = {}
        for n in names:
            if m := re.match(r"conv(\d+)_block(\d+)_", n):
                stage, block = int(m.group(1)), int(m.group(2))
                counts[stage] = max(counts.get(stage, 0), block)
        sizes = tuple(counts.get(s, 0) for s in range(2, max(counts, default=1) + 1))
        return ("resnet", layer_shapes["conv1_conv"][0][-1], sizes)
    return None


def module_signature(module: nn.Module) -> tuple | None:
    """The same summary for a Flax backbone (None for other modules)."""
    if isinstance(module, efficientnet.EfficientNet):
        stem = efficientnet.round_filters(
            module.stem_filters, module.width_coefficient, module.depth_divisor
        )
        blocks = tuple(spec.name for spec in module.block_specs())
        return ("efficientnet", stem, blocks, module.feature_channels()["final"])
    if isinstance(module, resnet.ResNet):
        return ("resnet", module.width, tuple(module.stage_sizes))
    return None


def describe(signature: tuple | None) -> str:
    """The architecture a signature stands for, in words (for error messages)."""
    if signature is None:
        return "neither a keras.applications EfficientNet nor a ResNet v1"
    if signature[0] == "resnet_v2":
        return "a ResNet v2 (pre-activation), which is not supported"
    if signature[0] == "efficientnet":
        return (
            f"an EfficientNet with a {signature[1]}-channel stem, "
            f"{len(signature[2])} blocks and a {signature[3]}-channel top"
        )
    return f"a ResNet v1 with {signature[1]} stem channels and blocks per stage {signature[2]}"


def identify(layer_shapes: LayerShapes) -> tuple[str | None, tuple | None]:
    """Returns (registry name or None, signature)."""
    found = signature(layer_shapes)
    for name in backbones.BACKBONES:
        if found is not None and module_signature(backbones.create_backbone(name)) == found:
            return name, found
    return None, found


def detect_architecture(keras_model: Any) -> str:
    """Returns the registry name of a keras.applications backbone.

    Args:
      keras_model: a Keras EfficientNetB0..B7 / ResNet50 / ResNet101 (or any
        model with the same layers) built with include_top=False.

    Returns:
      A key of `backbones.BACKBONES`, e.g. 'efficientnet_b3'.

    Raises:
      ValueError: the model has a classification head or pooling, or its
        layers match no registered backbone.
    """
    # The squeeze-excite blocks pool too, so look for Dense layers and at the
    # output rank rather than for pooling layers.
    head = [layer.name for layer in keras_model.layers if type(layer).__name__ == "Dense"]
    if head or len(keras_model.output_shape) != 4:
        raise ValueError(
            f"Keras model {keras_model.name!r} has a head (Dense layers {head}, output "
            f"shape {keras_model.output_shape}; built with "
            "include_top=True or pooling=...); rebuild it with include_top=False, "
            "pooling=None"
        )
    shapes = {
        layer.name: [tuple(w.shape) for w in layer.weights]
        for layer in keras_model.layers
        if layer.weights
    }
    name, found = identify(shapes)
    if name is None:
        raise ValueError(
            f"Keras model {keras_model.name!r} is {describe(found)}, which matches "
            f"no registered backbone; supported: {', '.join(KERAS_APPLICATIONS)}"
        )
    return name
