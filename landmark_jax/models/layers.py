"""Pooling (GAP, GeM) and the embedding neck shared by the retrieval models.

Both recipes end in the same shape: a pooled descriptor followed by a dense
"neck" that compresses it to the embedding. The neck variants are data
(`NECKS`), so a config names one instead of selecting code paths:

    dense_swish      Dense -> swish                  (GLR2020 1st place, Keras)
    dense_bn_prelu   Dense -> BatchNorm -> PReLU     (GLR2021 1st place, PyTorch)
    dense            Dense                           (linear projection)

Pooling and normalisation math runs in float32 even when the model computes in
bfloat16: x**p for p=3 overflows and loses precision quickly in bf16.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from landmark_jax.models.conv_lowering import conv_general_dilated_for

Dtype = Any

# PyTorch BatchNorm1d defaults (momentum 0.1 == flax 0.9, eps 1e-5): the
# GLR2021 neck was trained with them.
DEFAULT_NORM = functools.partial(nn.BatchNorm, momentum=0.9, epsilon=1e-5)

# torch.nn.PReLU initialises its single slope at 0.25 (flax's default is 0.01).
PRELU_SLOPE_INIT = 0.25

# How every BatchNorm of a model behaves in training (`model.batch_norm`):
# 'batch' normalises with the batch's statistics and updates the moving
# averages; 'frozen' normalises with the moving statistics and never updates
# them, while gamma and beta still train. 'frozen' is what a Keras model
# called as `model(images)` (no training=True) inside a GradientTape does,
# which is how the GLR2020 notebooks trained. Outside training both use the
# moving statistics.
BATCH_NORM_MODES = ("batch", "frozen")


def use_running_average(train: bool, batch_norm: str) -> bool:
    """BatchNorm's `use_running_average` for a training flag and a mode.

    Args:
      train: the model's training flag.
      batch_norm: a key of `BATCH_NORM_MODES`.

    Returns:
      True unless training with batch statistics.

    Raises:
      ValueError: an unknown mode, listing the valid ones.
    """
    if batch_norm not in BATCH_NORM_MODES:
        raise ValueError(f"unknown batch_norm mode {batch_norm!r}; valid: {BATCH_NORM_MODES}")
    return not train or batch_norm == "frozen"


def backbone_layers(
    backbone: Any, train: bool, conv: Callable[..., nn.Module]
) -> tuple[Callable[..., nn.Module], Callable[..., nn.Module]]:
    """A backbone's conv and BatchNorm layers: its family's convolution with
    the settings every backbone shares.

    Args:
      backbone: the backbone module (EfficientNet, ResNet); its attributes
        give the convolution's lowering (`conv_lowering`), the dtypes
        (`dtype`, `param_dtype`) and BatchNorm's mode, momentum and epsilon
        (`batch_norm`, `bn_momentum`, `bn_epsilon`).
      train: the backbone's training flag.
      conv: the family's nn.Conv with its own bias, padding and initialiser
        (efficientnet.CONV, resnet.CONV).

    Returns:
      (conv, norm) layer factories, as the family's blocks take them.
    """
    conv = functools.partial(
        conv,
        conv_general_dilated=conv_general_dilated_for(backbone.conv_lowering),
        dtype=backbone.dtype,
        param_dtype=backbone.param_dtype,
    )
    norm = functools.partial(
        nn.BatchNorm,
        use_running_average=use_running_average(train, backbone.batch_norm),
        momentum=backbone.bn_momentum,
        epsilon=backbone.bn_epsilon,
        dtype=backbone.dtype,
        param_dtype=backbone.param_dtype,
    )
    return conv, norm


# Rematerialisation of the backbone's blocks (model.remat): 'none' keeps every
# activation for the backward pass; 'blocks' keeps only each block's input and
# recomputes the block's insides in the backward pass (jax.checkpoint with the
# nothing_saveable policy), trading about one more forward pass for memory.
REMAT_MODES = ("none", "blocks")


def rematerialised(block: type[nn.Module], remat: str, static_argnums: tuple[int, ...] = ()):
    """`block`, or `nn.remat(block)` saving nothing inside it, by mode.

    Args:
      block: a block module class.
      remat: a key of REMAT_MODES.
      static_argnums: the positions of `__call__`'s Python arguments (self
        is 0), e.g. (2,) for `__call__(self, x, train)`.

    Returns:
      The class to instantiate; the same parameter names either way.

    Raises:
      ValueError: an unknown mode, listing the valid ones.
    """
    if remat not in REMAT_MODES:
        raise ValueError(f"unknown remat mode {remat!r}; valid: {REMAT_MODES}")
    if remat == "none":
        return block
    return nn.remat(
        block, policy=jax.checkpoint_policies.nothing_saveable, static_argnums=static_argnums
    )


# Floor on the norm in l2_normalize, as torch.nn.functional.normalize (eps=1e-12).
NORM_EPS = 1e-12


def l2_normalize(x: jax.Array, axis: int = -1) -> jax.Array:
    """x / max(||x||, NORM_EPS) along `axis`, in x's dtype (torch F.normalize).

    Computed as x * rsqrt(max(||x||^2, NORM_EPS^2)), so an all-zero vector
    stays zero instead of NaN. The heads and DOLG's attention use this one.
    """
    sq = jnp.sum(x * x, axis=axis, keepdims=True)
    return x * jax.lax.rsqrt(jnp.maximum(sq, NORM_EPS * NORM_EPS))


def l2_normalize_rows(x: Any, xp: Any = np) -> Any:
    """x / max(||x||, NORM_EPS) along the last axis, as a norm and a division.

    The embeddings' normalisation: each view's embedding in the jitted
    extraction (xp=jnp) and the mean of the views on the host (numpy, the
    default). It divides by the norm where `l2_normalize`, the layers' form,
    multiplies by an rsqrt; the two agree to rounding.
    """
    return x / xp.maximum(xp.linalg.norm(x, axis=-1, keepdims=True), NORM_EPS)


def global_avg_pool(x: jax.Array) -> jax.Array:
    """Averages an NHWC map over its spatial axes, in float32.

    Args:
      x: [batch, height, width, channels] feature map.

    Returns:
      [batch, channels] float32 array.
    """
    return jnp.mean(x.astype(jnp.float32), axis=(1, 2))


def gem_pool(x: jax.Array, p: jax.Array | float, eps: float = 1e-6) -> jax.Array:
    """Generalised-mean pooling: (mean(clip(x, eps) ** p)) ** (1 / p), in float32.

    p=1 is average pooling and p -> inf tends to max pooling. The map is divided
    by its per-channel spatial maximum before the power: GeM is 1-homogeneous,
    so the value is unchanged, but x**p can no longer overflow for large p or
    large activations. The maximum is a constant under differentiation, which
    is exact because the result does not depend on it.

    Args:
      x: [batch, height, width, channels] feature map (any float dtype).
      p: scalar exponent (a trainable parameter in `GeM`); must be > 0.
      eps: lower clamp so negative/zero activations give finite powers and
        finite gradients with respect to p.

    Returns:
      [batch, channels] float32 array.
    """
    x = jnp.maximum(x.astype(jnp.float32), eps)
    p = jnp.asarray(p, jnp.float32)
    scale = jax.lax.stop_gradient(jnp.max(x, axis=(1, 2), keepdims=True))
    mean_pow = jnp.mean((x / scale) ** p, axis=(1, 2))
    return scale[:, 0, 0, :] * mean_pow ** (1.0 / p)


class GlobalAvgPool(nn.Module):
    """Global average pooling as a module, so it is interchangeable with GeM."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Returns the [batch, channels] float32 spatial mean of an NHWC map."""
        return global_avg_pool(x)


class GeM(nn.Module):
    """GeM pooling with a trainable scalar exponent `p` (float32 param, shape ()).

    Attributes:
      p_init: initial exponent (3, as in both recipes and the DOLG paper).
      eps: lower clamp applied to activations before the power.
    """

    p_init: float = 3.0
    eps: float = 1e-6

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Returns the [batch, channels] float32 GeM of an NHWC map."""
        p = self.param("p", nn.initializers.constant(self.p_init), (), jnp.float32)
        return gem_pool(x, p, self.eps)


# Pooling variants by config name; each maps an NHWC map to [batch, channels].
POOLINGS: dict[str, Callable[..., nn.Module]] = {
    "gap": GlobalAvgPool,
    "gem": GeM,
}


def make_pooling(kind: str, **kwargs: Any) -> nn.Module:
    """Builds a pooling module by name.

    Args:
      kind: a key of `POOLINGS` ('gap' or 'gem').
      **kwargs: module attributes, e.g. `name='pool'`.

    Returns:
      An unbound linen module mapping [B, H, W, C] -> [B, C] float32.

    Raises:
      ValueError: for an unknown kind, listing the valid ones.
    """
    if kind not in POOLINGS:
        raise ValueError(f"unknown pooling {kind!r}; valid: {sorted(POOLINGS)}")
    return POOLINGS[kind](**kwargs)


@dataclasses.dataclass(frozen=True)
class NeckSpec:
    """One embedding-neck variant: Dense, then optional norm, then activation."""

    use_norm: bool
    activation: str | None  # None, 'swish' or 'prelu'


NECKS: dict[str, NeckSpec] = {
    "dense": NeckSpec(use_norm=False, activation=None),
    "dense_swish": NeckSpec(use_norm=False, activation="swish"),
    "dense_bn_prelu": NeckSpec(use_norm=True, activation="prelu"),
}


def check_neck(variant: str) -> NeckSpec:
    """Returns the spec of a neck variant.

    Raises:
      ValueError: for an unknown variant, listing the valid ones.
    """
    if variant not in NECKS:
        raise ValueError(f"unknown neck {variant!r}; valid: {sorted(NECKS)}")
    return NECKS[variant]


class EmbeddingNeck(nn.Module):
    """Dense projection of a pooled descriptor to the embedding.

    Parameters: `dense` (kernel [in, features], bias), then for
    'dense_bn_prelu' `bn` (scale, bias; batch_stats mean, var) and `prelu`
    (scalar `negative_slope`, init 0.25 as in PyTorch).

    Attributes:
      features: embedding size.
      variant: a key of `NECKS`.
      dtype: compute dtype of the Dense layer; norm and activation run in
        float32 and the output is float32.
      param_dtype: parameter dtype.
      norm: BatchNorm factory (PyTorch defaults), injected so a recipe can
        swap momentum/epsilon.
      batch_norm: a key of `BATCH_NORM_MODES`.
    """

    features: int = 512
    variant: str = "dense_swish"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    norm: Callable[..., nn.Module] = DEFAULT_NORM
    batch_norm: str = "batch"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """Projects [batch, in] to [batch, features] (float32, not normalised).

        Args:
          x: pooled descriptor [batch, in].
          train: training mode (BatchNorm per `batch_norm`).

        Returns:
          [batch, features] float32 embedding.
        """
        spec = check_neck(self.variant)
        y = nn.Dense(self.features, dtype=self.dtype, param_dtype=self.param_dtype, name="dense")(x)
        y = y.astype(jnp.float32)
        if spec.use_norm:
            y = self.norm(
                use_running_average=use_running_average(train, self.batch_norm),
                dtype=jnp.float32,
                param_dtype=self.param_dtype,
                name="bn",
            )(y)
        if spec.activation == "swish":
            y = nn.swish(y)
        elif spec.activation == "prelu":
            y = nn.PReLU(
                param_dtype=self.param_dtype, negative_slope_init=PRELU_SLOPE_INIT, name="prelu"
            )(y)
        return y.astype(jnp.float32)
