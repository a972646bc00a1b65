"""EfficientNet B0-B7 (Tan & Le, 2019) in Flax linen, layer for layer as Keras.

Variants are data: `EFFICIENTNET_B0_STAGES` holds the seven base stages and
`EFFICIENTNET_VARIANTS` the published (width, depth, resolution, dropout) of
each scaled model. Submodules carry the Keras layer names split at the block
prefix (Keras `block2a_expand_conv` is Flax `block2a/expand_conv`), so joining
a Flax path with '_' gives the Keras layer name; keras_import relies on it.

Padding: 'same' is TensorFlow SAME padding computed from each map's actual
size, as in the reference TF implementation and in Keras models built with a
fixed `input_shape`. 'keras_dynamic' pads (k//2 - 1, k//2) before every
stride-2 conv whatever the size, which is what a Keras model built with
`input_shape=None` does (its ZeroPadding2D sizes are fixed when the size is
unknown). The two agree whenever every strided map is even, i.e. for image
sizes that are multiples of 32.
"""

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from landmark_jax.models import input_normalization, layers

PADDINGS = ("same", "keras_dynamic")


@dataclasses.dataclass(frozen=True)
class StageArgs:
    """One stage of identical MBConv blocks, before width/depth scaling."""

    kernel_size: int
    repeats: int
    filters_in: int
    filters_out: int
    expand_ratio: int
    strides: int
    se_ratio: float = 0.25
    id_skip: bool = True


EFFICIENTNET_B0_STAGES = (
    StageArgs(3, 1, 32, 16, 1, 1),
    StageArgs(3, 2, 16, 24, 6, 2),
    StageArgs(5, 2, 24, 40, 6, 2),
    StageArgs(3, 3, 40, 80, 6, 2),
    StageArgs(5, 3, 80, 112, 6, 1),
    StageArgs(5, 4, 112, 192, 6, 2),
    StageArgs(3, 1, 192, 320, 6, 1),
)


class EfficientNetVariant(NamedTuple):
    """Published scaling of one variant; dropout is the classifier's."""

    width: float
    depth: float
    resolution: int
    dropout: float


EFFICIENTNET_VARIANTS: dict[str, EfficientNetVariant] = {
    "b0": EfficientNetVariant(1.0, 1.0, 224, 0.2),
    "b1": EfficientNetVariant(1.0, 1.1, 240, 0.2),
    "b2": EfficientNetVariant(1.1, 1.2, 260, 0.3),
    "b3": EfficientNetVariant(1.2, 1.4, 300, 0.3),
    "b4": EfficientNetVariant(1.4, 1.8, 380, 0.4),
    "b5": EfficientNetVariant(1.6, 2.2, 456, 0.4),
    "b6": EfficientNetVariant(1.8, 2.6, 528, 0.5),
    "b7": EfficientNetVariant(2.0, 3.1, 600, 0.5),
}


class BlockSpec(NamedTuple):
    """One MBConv block after scaling; `drop_rate` is its drop-connect rate."""

    name: str
    filters_in: int
    filters_out: int
    kernel_size: int
    strides: int
    expand_ratio: int
    se_ratio: float
    id_skip: bool
    drop_rate: float


def round_filters(filters: int, width: float, divisor: int = 8) -> int:
    """Scales a channel count by `width`, rounded to a multiple of `divisor`."""
    filters *= width
    new_filters = max(divisor, int(filters + divisor / 2) // divisor * divisor)
    if new_filters < 0.9 * filters:  # never round down by more than 10%
        new_filters += divisor
    return int(new_filters)


def round_repeats(repeats: int, depth: float) -> int:
    """Scales a stage's block count by `depth`, rounding up."""
    return int(math.ceil(depth * repeats))


def _conv_padding(kernel_size: int, strides: int, padding: str) -> Any:
    if padding not in PADDINGS:
        raise ValueError(f"padding must be one of {PADDINGS}, got {padding!r}")
    if strides == 1 or padding == "same":
        return "SAME"
    pad = (kernel_size // 2 - 1, kernel_size // 2)
    return (pad, pad)


# Keras's EfficientNet initialiser: He-style variance over fan-out. For the
# depthwise kernel [k, k, 1, C], Keras's fan-out is k*k (its kernel is
# [k, k, C, 1]), hence the swapped axes.
_CONV_INIT = nn.initializers.variance_scaling(2.0, "fan_out", "truncated_normal")
_DEPTHWISE_INIT = nn.initializers.variance_scaling(
    2.0, "fan_out", "truncated_normal", in_axis=-1, out_axis=-2
)
# The family's convolution (Keras's): no biases, SAME padding (the strided
# ones set theirs, _conv_padding), the initialiser above. The settings every
# backbone shares come from layers.backbone_layers.
CONV = functools.partial(nn.Conv, use_bias=False, padding="SAME", kernel_init=_CONV_INIT)


class MBConvBlock(nn.Module):
    """Inverted residual block: expand, depthwise, squeeze-excite, project."""

    spec: BlockSpec
    conv: Callable[..., nn.Module]
    norm: Callable[..., nn.Module]
    act: Callable[[jax.Array], jax.Array]
    padding: str = "same"

    @nn.compact
    def __call__(self, inputs: jax.Array, train: bool = False) -> jax.Array:
        s = self.spec
        filters = s.filters_in * s.expand_ratio
        x = inputs
        if s.expand_ratio != 1:
            x = self.conv(filters, (1, 1), name="expand_conv")(x)
            x = self.act(self.norm(name="expand_bn")(x))
        k = s.kernel_size
        x = self.conv(
            filters,
            (k, k),
            strides=s.strides,
            padding=_conv_padding(k, s.strides, self.padding),
            feature_group_count=filters,
            kernel_init=_DEPTHWISE_INIT,
            name="dwconv",
        )(x)
        x = self.act(self.norm(name="bn")(x))
        if 0 < s.se_ratio <= 1:
            filters_se = max(1, int(s.filters_in * s.se_ratio))
            se = jnp.mean(x, axis=(1, 2), keepdims=True)
            se = self.act(self.conv(filters_se, (1, 1), use_bias=True, name="se_reduce")(se))
            se = self.conv(filters, (1, 1), use_bias=True, name="se_expand")(se)
            x = x * nn.sigmoid(se)
        x = self.conv(s.filters_out, (1, 1), name="project_conv")(x)
        x = self.norm(name="project_bn")(x)
        if s.id_skip and s.strides == 1 and s.filters_in == s.filters_out:
            if s.drop_rate > 0:
                # Drop-connect: drop the whole residual branch per example.
                x = nn.Dropout(s.drop_rate, broadcast_dims=(1, 2, 3), name="drop")(
                    x, deterministic=not train
                )
            x = x + inputs
        return x


class EfficientNet(nn.Module):
    """EfficientNet backbone returning feature maps by stride.

    Attributes:
      width_coefficient: channel multiplier (see `EFFICIENTNET_VARIANTS`).
      depth_coefficient: block-count multiplier.
      stages: the unscaled stage table.
      depth_divisor: channel counts are rounded to multiples of this.
      stem_filters: unscaled stem width.
      top_filters: unscaled width of the final 1x1 conv.
      drop_connect_rate: stochastic-depth rate of the last block (linear in
        block index from 0); needs a 'dropout' rng when `train`.
      stem_stride: 2 as published; 1 keeps twice the resolution throughout
        (the feature keys keep their nominal names, so 'stride_k' is then a
        map at stride k/2).
      padding: 'same' or 'keras_dynamic' (see the module docstring).
      bn_momentum: BatchNorm running-average momentum (Keras's 0.99).
      bn_epsilon: BatchNorm epsilon (Keras's 1e-3).
      batch_norm: a key of `layers.BATCH_NORM_MODES`: batch statistics in
        training, or the moving statistics ('frozen').
      conv_lowering: a key of `conv_lowering.CONV_LOWERINGS`: XLA's
        convolution or im2col + matmul ('auto': im2col on a CPU).
      remat: a key of `layers.REMAT_MODES`: 'blocks' recomputes each MBConv
        block in the backward pass instead of keeping its activations.
      input_scale: per-channel factor of the first op, `x * scale + offset`.
      input_offset: per-channel offset of that op.
      dtype: computation dtype.
      param_dtype: parameter dtype.
      act: activation (swish).
    """

    width_coefficient: float = 1.0
    depth_coefficient: float = 1.0
    stages: tuple[StageArgs, ...] = EFFICIENTNET_B0_STAGES
    depth_divisor: int = 8
    stem_filters: int = 32
    top_filters: int = 1280
    drop_connect_rate: float = 0.2
    stem_stride: int = 2
    padding: str = "same"
    bn_momentum: float = 0.99
    bn_epsilon: float = 1e-3
    batch_norm: str = "batch"
    conv_lowering: str = "auto"
    remat: str = "none"
    input_scale: tuple[float, float, float] = input_normalization.IMAGENET_SCALE
    input_offset: tuple[float, float, float] = input_normalization.IMAGENET_OFFSET
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    act: Callable[[jax.Array], jax.Array] = nn.swish

    def _filters(self, filters: int) -> int:
        return round_filters(filters, self.width_coefficient, self.depth_divisor)

    def block_specs(self) -> list[BlockSpec]:
        """The scaled blocks in order, named like Keras ('block1a', ...)."""
        total = sum(round_repeats(st.repeats, self.depth_coefficient) for st in self.stages)
        specs = []
        for i, st in enumerate(self.stages):
            filters_in, filters_out = self._filters(st.filters_in), self._filters(st.filters_out)
            for j in range(round_repeats(st.repeats, self.depth_coefficient)):
                specs.append(
                    BlockSpec(
                        name=f"block{i + 1}{chr(ord('a') + j)}",
                        filters_in=filters_in if j == 0 else filters_out,
                        filters_out=filters_out,
                        kernel_size=st.kernel_size,
                        strides=st.strides if j == 0 else 1,
                        expand_ratio=st.expand_ratio,
                        se_ratio=st.se_ratio,
                        id_skip=st.id_skip,
                        drop_rate=self.drop_connect_rate * len(specs) / total,
                    )
                )
        return specs

    def _stage_strides(self) -> list[tuple[int, int]]:
        """(nominal stride after the stage, last block index) per stage."""
        out, stride, index = [], 2, -1
        for st in self.stages:
            stride *= st.strides
            index += round_repeats(st.repeats, self.depth_coefficient)
            out.append((stride, index))
        return out

    def feature_channels(self) -> dict[str, int]:
        """Channel count of every map `__call__` returns, by key."""
        specs = self.block_specs()
        channels = {f"stride_{s}": specs[i].filters_out for s, i in self._stage_strides()}
        channels["final"] = self._filters(self.top_filters)
        return channels

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> dict[str, jax.Array]:
        """Runs the backbone.

        Args:
          x: [batch, height, width, 3] RGB pixels in [0, 255].
          train: batch statistics and drop-connect on (needs a 'dropout' rng).

        Returns:
          {'stride_2', ..., 'stride_32': last block output at that nominal
          stride, 'final': top conv + BN + swish, as Keras include_top=False}.
        """
        conv, norm = layers.backbone_layers(self, train, CONV)
        x = input_normalization.normalize_pixels(x, self.input_scale, self.input_offset, self.dtype)
        x = conv(
            self._filters(self.stem_filters),
            (3, 3),
            strides=self.stem_stride,
            padding=_conv_padding(3, self.stem_stride, self.padding),
            name="stem_conv",
        )(x)
        x = self.act(norm(name="stem_bn")(x))

        stride_after = {i: s for s, i in self._stage_strides()}
        features = {}
        block = layers.rematerialised(MBConvBlock, self.remat, static_argnums=(2,))
        for index, spec in enumerate(self.block_specs()):
            x = block(
                spec, conv=conv, norm=norm, act=self.act, padding=self.padding, name=spec.name
            )(x, train)
            if index in stride_after:  # a later stage at the same stride overwrites
                features[f"stride_{stride_after[index]}"] = x
        x = conv(self._filters(self.top_filters), (1, 1), name="top_conv")(x)
        features["final"] = self.act(norm(name="top_bn")(x))
        return features
