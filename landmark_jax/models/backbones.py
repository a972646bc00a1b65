"""Backbone registry: names -> Flax modules, and the input-size check.

Every backbone maps [batch, H, W, 3] pixels in [0, 255] to a dict of feature
maps `stride_2` ... `stride_32` and `final` (see efficientnet.py, resnet.py),
and reports their channel counts through `module.feature_channels()`.

The `*_tiny` entries exist for tests and smoke runs: they build and compile
in seconds on a CPU at 32 px.
"""

import dataclasses
import numbers
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn

from landmark_jax.models import efficientnet, resnet
from landmark_jax.models import input_normalization as normalization_presets


@dataclasses.dataclass(frozen=True)
class BackboneSpec:
    """A registry entry.

    Attributes:
      module: the Flax module class.
      kwargs: its constructor arguments for this variant.
      default_image_size: the variant's published training resolution.
      min_image_size: smallest height/width for which every stride map is
        at least 1x1 (before `stem_stride` overrides).
      head_dropout: the published dropout before the classifier, for necks.
    """

    module: type[nn.Module]
    kwargs: Mapping[str, Any]
    default_image_size: int
    min_image_size: int = 32
    head_dropout: float = 0.0


def _efficientnet_entries() -> dict[str, BackboneSpec]:
    return {
        f"efficientnet_{name}": BackboneSpec(
            efficientnet.EfficientNet,
            {"width_coefficient": v.width, "depth_coefficient": v.depth},
            default_image_size=v.resolution,
            head_dropout=v.dropout,
        )
        for name, v in efficientnet.EFFICIENTNET_VARIANTS.items()
    }


BACKBONES: dict[str, BackboneSpec] = {
    **_efficientnet_entries(),
    # 8-48 channels, one block per stage but two in stage 6: for tests and
    # smoke runs. No drop-connect by default, so train=True needs no
    # 'dropout' rng (the B0-B7 entries do need one); pass drop_connect_rate
    # to exercise it.
    "efficientnet_tiny": BackboneSpec(
        efficientnet.EfficientNet,
        {
            "width_coefficient": 0.1,
            "depth_coefficient": 0.3,
            "top_filters": 640,
            "drop_connect_rate": 0.0,
        },
        default_image_size=32,
    ),
    **{
        name: BackboneSpec(resnet.ResNet, {"stage_sizes": sizes}, default_image_size=224)
        for name, sizes in resnet.RESNET_STAGE_SIZES.items()
    },
    "resnet_tiny": BackboneSpec(
        resnet.ResNet, {"stage_sizes": (1, 1, 1, 1), "width": 8}, default_image_size=32
    ),
    # One bottleneck block per stage, 32-1024 channels: the demo's backbone,
    # small enough to train from scratch on 2 CPU cores in minutes (measured
    # there: 1.4x the images/s of efficientnet_tiny at 64 px, whose depthwise
    # convolutions CPUs run slowly, and 3x its retrieval mAP after 600 steps).
    "resnet_small": BackboneSpec(
        resnet.ResNet, {"stage_sizes": (1, 1, 1, 1), "width": 32}, default_image_size=64
    ),
}


def _spec(name: str) -> BackboneSpec:
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; valid names: {', '.join(BACKBONES)}")
    return BACKBONES[name]


def backbone_option(name: str, option: str) -> Any:
    """The value a registry backbone's module attribute takes by default.

    Args:
      name: a key of `BACKBONES`.
      option: a module attribute, e.g. 'padding' or 'drop_connect_rate'.

    Returns:
      The variant's value (its registry kwargs over the module's field
      default), or None when the module has no such attribute (a ResNet has
      no 'padding').

    Raises:
      ValueError: on an unknown name (the message lists the valid names).
    """
    spec = _spec(name)
    if option in spec.kwargs:
        return spec.kwargs[option]
    fields = {f.name: f for f in dataclasses.fields(spec.module)}
    return fields[option].default if option in fields else None


def create_backbone(
    name: str, input_normalization: str | None = None, **overrides: Any
) -> nn.Module:
    """Builds the backbone registered as `name`.

    Args:
      name: a key of `BACKBONES`, e.g. 'efficientnet_b7', 'resnet101'.
      input_normalization: a preset of
        `input_normalization.INPUT_NORMALIZATIONS` setting input_scale and
        input_offset (e.g. 'caffe' for converted Keras ResNet weights);
        None keeps the module default ('imagenet').
      **overrides: module attributes replacing the variant's, e.g. dtype,
        input_scale/input_offset, drop_connect_rate, stem_stride, padding.

    Returns:
      An unbound Flax module.

    Raises:
      ValueError: on an unknown name (the message lists the valid names),
        an unknown preset, or an attribute the module does not have.
    """
    spec = _spec(name)
    fields = {f.name for f in dataclasses.fields(spec.module)} - {"parent", "name"}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"{name}: unknown backbone option(s) {unknown}; valid: {sorted(fields)}")
    if input_normalization is not None:
        preset = normalization_presets.get_input_normalization(input_normalization)
        overrides = {"input_scale": preset.scale, "input_offset": preset.offset, **overrides}
    return spec.module(**{**spec.kwargs, **overrides})


def check_image_size(name: str, image_size: int | Sequence[int]) -> None:
    """Rejects an image size the backbone cannot take, before any compile.

    Any height/width >= `min_image_size` (32 for all current entries) works;
    multiples of 32 give stride maps of exactly size/stride.

    Args:
      name: a key of `BACKBONES`.
      image_size: an int (square) or (height, width).

    Raises:
      ValueError: for an unknown backbone, or a size that is not a positive
        int or is smaller than the backbone's minimum.
    """
    spec = _spec(name)
    if isinstance(image_size, numbers.Integral):
        sizes = (image_size, image_size)
    else:
        try:
            sizes = tuple(image_size)
        except TypeError:
            sizes = ()
    if len(sizes) != 2 or not all(
        isinstance(s, numbers.Integral) and not isinstance(s, bool) for s in sizes
    ):
        raise ValueError(f"image size must be an int or (height, width) ints, got {image_size!r}")
    if min(sizes) < spec.min_image_size:
        raise ValueError(
            f"image size {image_size!r} is too small for {name}: height and width "
            f"must be >= {spec.min_image_size} so the stride-32 map is not empty"
        )
