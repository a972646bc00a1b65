"""ResNet v1 (He et al., 2016) in Flax linen, layer for layer as Keras.

This is `keras.applications.ResNet50/101`: bottleneck blocks with the stride
in the first 1x1 conv, biases on every conv, BatchNorm epsilon 1.001e-5, zero
padding before the 7x7 stem and the max pool. Module names are the Keras
layer names split at the block prefix (Keras `conv3_block2_1_conv` is Flax
`conv3_block2/1_conv`), so joining a Flax path with '_' gives the Keras name.

Variants are data: `RESNET_STAGE_SIZES` gives the blocks per stage.
"""

import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from landmark_jax.models import input_normalization, layers, superglobal_pooling

RESNET_STAGE_SIZES: dict[str, tuple[int, ...]] = {
    "resnet50": (3, 4, 6, 3),
    "resnet101": (3, 4, 23, 3),
}
EXPANSION = 4  # bottleneck output channels = EXPANSION * bottleneck width

# He initialisation for from-scratch training; imported weights replace it.
_CONV_INIT = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
# The family's convolution (Keras's): biases, VALID padding (the stem and the
# 3x3 convs pad explicitly), the initialiser above. The settings every
# backbone shares come from layers.backbone_layers.
CONV = functools.partial(nn.Conv, use_bias=True, padding="VALID", kernel_init=_CONV_INIT)


class BottleneckBlock(nn.Module):
    """1x1 (strided) -> 3x3 -> 1x1 with a projection shortcut when needed.

    `act` follows the first two convs; `out_act` (None: `act`) the sum with
    the shortcut.
    """

    filters: int
    strides: int
    conv_shortcut: bool
    conv: Callable[..., nn.Module]
    norm: Callable[..., nn.Module]
    act: Callable[[jax.Array], jax.Array]
    out_act: Callable[[jax.Array], jax.Array] | None = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.conv_shortcut:
            shortcut = self.conv(
                EXPANSION * self.filters, (1, 1), strides=self.strides, name="0_conv"
            )(x)
            shortcut = self.norm(name="0_bn")(shortcut)
        else:
            shortcut = x
        y = self.conv(self.filters, (1, 1), strides=self.strides, name="1_conv")(x)
        y = self.act(self.norm(name="1_bn")(y))
        y = self.conv(self.filters, (3, 3), padding=((1, 1), (1, 1)), name="2_conv")(y)
        y = self.act(self.norm(name="2_bn")(y))
        y = self.conv(EXPANSION * self.filters, (1, 1), name="3_conv")(y)
        y = self.norm(name="3_bn")(y)
        return (self.out_act or self.act)(shortcut + y)


class ResNet(nn.Module):
    """ResNet v1 backbone returning feature maps by stride.

    Attributes:
      stage_sizes: blocks in conv2..conv5 (see `RESNET_STAGE_SIZES`).
      width: stem channels and conv2's bottleneck width (doubling per stage).
      stem_stride: 2 as published; 1 keeps twice the resolution throughout
        (the feature keys keep their nominal names).
      bn_momentum: BatchNorm running-average momentum (Keras's 0.99).
      bn_epsilon: BatchNorm epsilon (Keras's 1.001e-5).
      batch_norm: a key of `layers.BATCH_NORM_MODES`: batch statistics in
        training, or the moving statistics ('frozen').
      conv_lowering: a key of `conv_lowering.CONV_LOWERINGS`: XLA's
        convolution or im2col + matmul ('auto': im2col on a CPU).
      remat: a key of `layers.REMAT_MODES`: 'blocks' recomputes each
        bottleneck block in the backward pass instead of keeping its
        activations.
      input_scale: per-channel factor of the first op, `x * scale + offset`.
      input_offset: per-channel offset of that op.
      dtype: computation dtype.
      param_dtype: parameter dtype.
      act: activation (ReLU).
      relu_plus: None, or SuperGlobal's ReLU+ floor alpha: the activations
        `superglobal_pooling.relu_plus_stages` names (every block output but
        the last stage's, the first stage's inner ones) become
        max(x, alpha). Set at extraction only (never by the factory).
    """

    stage_sizes: tuple[int, ...] = RESNET_STAGE_SIZES["resnet50"]
    width: int = 64
    stem_stride: int = 2
    bn_momentum: float = 0.99
    bn_epsilon: float = 1.001e-5
    batch_norm: str = "batch"
    conv_lowering: str = "auto"
    remat: str = "none"
    input_scale: tuple[float, float, float] = input_normalization.IMAGENET_SCALE
    input_offset: tuple[float, float, float] = input_normalization.IMAGENET_OFFSET
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    act: Callable[[jax.Array], jax.Array] = nn.relu
    relu_plus: float | None = None

    def feature_channels(self) -> dict[str, int]:
        """Channel count of every map `__call__` returns, by key."""
        channels = {"stride_2": self.width}
        for i in range(len(self.stage_sizes)):
            channels[f"stride_{4 * 2**i}"] = EXPANSION * self.width * 2**i
        channels["final"] = channels[f"stride_{4 * 2 ** (len(self.stage_sizes) - 1)}"]
        return channels

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> dict[str, jax.Array]:
        """Runs the backbone.

        Args:
          x: [batch, height, width, 3] pixels in [0, 255].
          train: use batch statistics in BatchNorm.

        Returns:
          {'stride_2': stem conv output, 'stride_4'..'stride_32': conv2..conv5
          outputs, 'final': conv5 output, as Keras include_top=False}.
        """
        conv, norm = layers.backbone_layers(self, train, CONV)
        x = input_normalization.normalize_pixels(x, self.input_scale, self.input_offset, self.dtype)
        x = conv(
            self.width,
            (7, 7),
            strides=self.stem_stride,
            padding=((3, 3), (3, 3)),
            name="conv1_conv",
        )(x)
        x = self.act(norm(name="conv1_bn")(x))
        features = {"stride_2": x}
        # Zero padding equals -inf padding here: the input is post-ReLU.
        x = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding="VALID")
        block = layers.rematerialised(BottleneckBlock, self.remat)
        floored = functools.partial(superglobal_pooling.relu_plus, alpha=self.relu_plus)
        stages = superglobal_pooling.relu_plus_stages(len(self.stage_sizes))
        for i, num_blocks in enumerate(self.stage_sizes):
            inner, out = (
                (floored if plus else self.act for plus in stages[i])
                if self.relu_plus is not None
                else (self.act, self.act)
            )
            for j in range(num_blocks):
                x = block(
                    filters=self.width * 2**i,
                    strides=2 if i > 0 and j == 0 else 1,
                    conv_shortcut=j == 0,
                    conv=conv,
                    norm=norm,
                    act=inner,
                    out_act=out,
                    name=f"conv{i + 2}_block{j + 1}",
                )(x)
            features[f"stride_{4 * 2**i}"] = x
        features["final"] = x
        return features
