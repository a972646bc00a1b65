"""DOLG: Deep Orthogonal fusion of Local and Global features (Yang et al. 2021).

Data flow (shapes for a backbone with C16/C32 channels at strides 16/32):

    image [B,H,W,3] -> backbone -> {'stride_16': [B,h,w,C16], 'stride_32': [B,h',w',C32]}
    local:  stride_16 -> MultiAtrousModule -> [B,h,w,local_dim]
                      -> SpatialAttention  -> f_l [B,h,w,local_dim]  (float32)
    global: stride_32 -> GLOBAL_BRANCHES[global_branch] -> f_g [B,global_dim] (float32)
    fusion: orthogonal_fusion(f_l, f_g) -> [B,h,w,2*local_dim] -> GAP -> neck -> [B,embedding_dim]

Two published variants of the global branch are kept as data:

    gem_fc            pool (GeM) -> Dense(global_dim)             official DOLG code
    conv_bn_silu_gem  1x1 conv -> BN -> SiLU (global_dim) -> pool GLR2021 1st place

The local branch follows Henkel (three dilated 3x3 convs, 512 channels each, no
per-branch activation) with the official code's image-pooling branch as a flag;
with no dilations and no image pooling there is no multi-atrous module, and the
attention reads the stride-16 map itself, as the official code does by default
(`MODEL.WITH_MA = False`; its optional ASPP also has a 1x1 branch, not built here).
The global branch reads 'stride_32' (for EfficientNet the last block output,
before the top conv, as timm's features_only map that Henkel used; for ResNet
the res5 map of the official code). The projection divides by ||f_g||^2 (the
official code; Henkel's divides by ||f_g||, a scaled, not a true, projection).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from landmark_jax.models import layers, superglobal_pooling

Dtype = Any


def orthogonal_fusion(f_local: jax.Array, f_global: jax.Array, eps: float = 1e-6) -> jax.Array:
    """Removes from each local vector its projection on the global vector, then concatenates.

    f_perp = f_l - (<f_l, f_g> / ||f_g||^2) f_g at every location, so
    <f_perp, f_g> = 0. The denominator is floored at `eps` (not offset by it),
    so the projection is exact whenever ||f_g||^2 > eps.

    Args:
      f_local: [batch, height, width, channels] local feature map.
      f_global: [batch, channels] global descriptor.
      eps: floor on ||f_g||^2.

    Returns:
      [batch, height, width, 2 * channels] float32 map: [f_perp, f_g broadcast
      over the spatial axes].

    Raises:
      ValueError: when the channel counts differ.
    """
    if f_local.shape[-1] != f_global.shape[-1]:
        raise ValueError(
            f"local ({f_local.shape[-1]}) and global ({f_global.shape[-1]}) "
            "channel counts must match for the projection"
        )
    f_l = f_local.astype(jnp.float32)
    f_g = f_global.astype(jnp.float32)[:, None, None, :]
    sq_norm = jnp.maximum(jnp.sum(f_g * f_g, axis=-1, keepdims=True), eps)
    f_perp = f_l - jnp.sum(f_l * f_g, axis=-1, keepdims=True) / sq_norm * f_g
    return jnp.concatenate([f_perp, jnp.broadcast_to(f_g, f_l.shape)], axis=-1)


class MultiAtrousModule(nn.Module):
    """Parallel dilated 3x3 convs (+ optional image pooling), concat, 1x1 conv, ReLU.

    'SAME' padding keeps the spatial size for every dilation, even when the
    dilation exceeds the map (the taps then read zero padding).

    Attributes:
      dilations: one 3x3 conv branch per dilation.
      branch_channels: output channels of each branch.
      out_channels: channels after the 1x1 projection (`local_dim`).
      image_pooling: add a branch GAP -> 1x1 conv -> ReLU -> broadcast
        (official DOLG code; Henkel's GLR2021 model has none).
      dtype: compute dtype; param_dtype: parameter dtype.
    """

    dilations: Sequence[int] = (6, 12, 18)
    branch_channels: int = 512
    out_channels: int = 1024
    image_pooling: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Maps [B,h,w,C] to [B,h,w,out_channels] in `dtype`."""
        conv = functools.partial(nn.Conv, dtype=self.dtype, param_dtype=self.param_dtype)
        branches = [
            conv(
                self.branch_channels, (3, 3), padding="SAME", kernel_dilation=d, name=f"atrous_{i}"
            )(x)
            for i, d in enumerate(self.dilations)
        ]
        if self.image_pooling:
            pooled = layers.global_avg_pool(x)[:, None, None, :]
            pooled = nn.relu(conv(self.branch_channels, (1, 1), name="image_pool")(pooled))
            # Bilinear upsampling of a 1x1 map is a broadcast.
            branches.append(jnp.broadcast_to(pooled, branches[0].shape))
        y = jnp.concatenate(branches, axis=-1)
        return nn.relu(conv(self.out_channels, (1, 1), name="project")(y))


class SpatialAttention(nn.Module):
    """DELF-style attention: L2-normalised features weighted by a softplus score.

    y = BN(conv1x1(x)); out = normalize(y) * softplus(conv1x1_to_1(ReLU(y))).

    Attributes:
      channels: output channels of the first 1x1 conv.
      dtype: compute dtype of the convs and BN; the normalisation, softplus
        and product run in float32.
      param_dtype: parameter dtype.
      norm: BatchNorm factory.
      batch_norm: a key of `layers.BATCH_NORM_MODES`.
    """

    channels: int = 1024
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    norm: Callable[..., nn.Module] = layers.DEFAULT_NORM
    batch_norm: str = "batch"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> tuple[jax.Array, jax.Array]:
        """Returns (attended features [B,h,w,channels], scores [B,h,w,1]), float32."""
        conv = functools.partial(nn.Conv, dtype=self.dtype, param_dtype=self.param_dtype)
        y = conv(self.channels, (1, 1), name="conv")(x)
        y = self.norm(
            use_running_average=layers.use_running_average(train, self.batch_norm),
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="bn",
        )(y)
        logits = conv(1, (1, 1), name="score")(nn.relu(y))
        scores = jax.nn.softplus(logits.astype(jnp.float32))
        return layers.l2_normalize(y.astype(jnp.float32), axis=-1) * scores, scores


@dataclasses.dataclass(frozen=True)
class GlobalBranchSpec:
    """A global-branch variant: [1x1 conv -> BN -> SiLU] -> pooling -> [Dense]."""

    conv_bn_act: bool
    fc: bool


GLOBAL_BRANCHES: dict[str, GlobalBranchSpec] = {
    "gem_fc": GlobalBranchSpec(conv_bn_act=False, fc=True),
    "conv_bn_silu_gem": GlobalBranchSpec(conv_bn_act=True, fc=False),
}


def check_global_branch(name: str) -> GlobalBranchSpec:
    """Returns the spec of a global-branch variant.

    Raises:
      ValueError: for an unknown variant, listing the valid ones.
    """
    if name not in GLOBAL_BRANCHES:
        raise ValueError(f"unknown global_branch {name!r}; valid: {sorted(GLOBAL_BRANCHES)}")
    return GLOBAL_BRANCHES[name]


class DOLG(nn.Module):
    """DOLG retrieval model on a registry backbone.

    Variables: `backbone`, `local_atrous` (MultiAtrousModule), `local_attention`
    (SpatialAttention), `global_conv` and `global_bn` (conv_bn_silu_gem only),
    `global_pool` (GeM: scalar `p`), `global_fc` (gem_fc only), `neck`.

    Attributes:
      backbone: registry backbone returning a dict of NHWC maps.
      embedding_dim: output size (512 in both references).
      local_dim: channels of the local branch; must equal global_dim.
      global_dim: size of the global vector.
      dilations, branch_channels, image_pooling: see MultiAtrousModule; ()
        and False: no such module (the official code's default).
      global_branch: a key of GLOBAL_BRANCHES.
      pooling: pooling of the global branch, a key of layers.POOLINGS.
      neck: a key of layers.NECKS (GLR2021: dense_bn_prelu).
      dropout: rate on the fused pooled descriptor during training.
      local_key, global_key: backbone maps feeding the two branches.
      dtype: compute dtype (bf16 for mixed precision); params are float32.
      norm: BatchNorm factory used in every head BN.
      batch_norm: a key of `layers.BATCH_NORM_MODES`, for the head BNs (the
        backbone carries its own).
      pool_override: None (the global branch's trained pooling), or
        SuperGlobal's GeM+ / Regional-GeM in its place at extraction
        (superglobal_pooling; never set by the factory).
    """

    backbone: nn.Module
    embedding_dim: int = 512
    local_dim: int = 1024
    global_dim: int = 1024
    dilations: Sequence[int] = (6, 12, 18)
    branch_channels: int = 512
    image_pooling: bool = False
    global_branch: str = "gem_fc"
    pooling: str = "gem"
    neck: str = "dense_bn_prelu"
    dropout: float = 0.0
    local_key: str = "stride_16"
    global_key: str = "stride_32"
    dtype: Dtype = jnp.float32
    norm: Callable[..., nn.Module] = layers.DEFAULT_NORM
    batch_norm: str = "batch"
    pool_override: superglobal_pooling.PoolingOverride | None = None

    def _check(self) -> GlobalBranchSpec:
        if self.local_dim != self.global_dim:
            raise ValueError(
                f"DOLG needs local_dim == global_dim for the orthogonal projection, "
                f"got {self.local_dim} and {self.global_dim}"
            )
        return check_global_branch(self.global_branch)

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """Computes the embedding.

        Args:
          x: [batch, height, width, 3] raw pixels in 0..255.
          train: training mode (dropout; BatchNorm per `batch_norm`).

        Returns:
          [batch, embedding_dim] float32 embedding, NOT L2-normalised. Sown
          under `intermediates`: `local` (f_l [B,h,w,local_dim]), `attention`
          ([B,h,w,1]), `global` (f_g [B,global_dim]), `fused` (orthogonal
          fusion output [B,h,w,2*local_dim]), `pooled` ([B,2*local_dim]).
        """
        spec = self._check()
        features = self.backbone(x, train=train)
        for key in (self.local_key, self.global_key):
            if key not in features:
                raise ValueError(
                    f"backbone has no feature map {key!r}; available: {sorted(features)}"
                )
        conv = functools.partial(nn.Conv, dtype=self.dtype, param_dtype=jnp.float32)

        local = features[self.local_key]
        if self.dilations or self.image_pooling:
            local = MultiAtrousModule(
                dilations=tuple(self.dilations),
                branch_channels=self.branch_channels,
                out_channels=self.local_dim,
                image_pooling=self.image_pooling,
                dtype=self.dtype,
                name="local_atrous",
            )(local)
        f_local, scores = SpatialAttention(
            channels=self.local_dim,
            dtype=self.dtype,
            norm=self.norm,
            batch_norm=self.batch_norm,
            name="local_attention",
        )(local, train=train)

        g = features[self.global_key]
        if spec.conv_bn_act:
            g = conv(self.global_dim, (1, 1), name="global_conv")(g)
            g = self.norm(
                use_running_average=layers.use_running_average(train, self.batch_norm),
                dtype=self.dtype,
                name="global_bn",
            )(g)
            g = nn.silu(g)
        pool = layers.make_pooling(self.pooling, name="global_pool")
        f_global = pool(g) if self.pool_override is None else self.pool_override(g, pool)
        if spec.fc:
            f_global = nn.Dense(self.global_dim, dtype=self.dtype, name="global_fc")(f_global)
        f_global = f_global.astype(jnp.float32)

        fused = orthogonal_fusion(f_local, f_global)
        pooled = layers.global_avg_pool(fused)
        for name, value in (
            ("local", f_local),
            ("attention", scores),
            ("global", f_global),
            ("fused", fused),
            ("pooled", pooled),
        ):
            self.sow("intermediates", name, value)
        pooled = nn.Dropout(self.dropout, deterministic=not train or self.dropout == 0.0)(pooled)
        return layers.EmbeddingNeck(
            features=self.embedding_dim,
            variant=self.neck,
            dtype=self.dtype,
            norm=self.norm,
            batch_norm=self.batch_norm,
            name="neck",
        )(pooled, train=train)
