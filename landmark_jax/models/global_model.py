"""The GLR2020 retrieval model: backbone -> global pooling -> embedding neck.

The 1st-place GLR2020 model is EfficientNet (include_top=False), global average
pooling and Dense(512, swish); its 512-d output is the descriptor. Pooling
('gap' or 'gem') and the neck variant are configurable, so the same module also
covers the GeM / BN-PReLU variants of later recipes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from landmark_jax.models import layers, superglobal_pooling

Dtype = Any


class GlobalModel(nn.Module):
    """Backbone, pooling of one feature map, optional dropout, embedding neck.

    Variables: the backbone's under `backbone` (so ImageNet weights converted
    from Keras load into `params['backbone']`), the pooling's under `pool`
    (GeM: scalar `p`), the neck's under `neck` (see `layers.EmbeddingNeck`).

    Attributes:
      backbone: a registry backbone (`backbones.create_backbone`): input raw
        pixels 0..255 NHWC, output a dict of NHWC maps.
      embedding_dim: output size.
      pooling: a key of `layers.POOLINGS` ('gap' or 'gem').
      neck: a key of `layers.NECKS`.
      dropout: rate applied to the pooled descriptor during training (needs a
        'dropout' rng when > 0 and train=True).
      feature_key: which backbone map to pool; 'final' is the Keras
        include_top=False output (after EfficientNet's top conv).
      dtype: compute dtype of the neck (the backbone carries its own).
      norm: BatchNorm factory for the neck.
      batch_norm: a key of `layers.BATCH_NORM_MODES`, for the neck (the
        backbone carries its own).
      pool_override: None (the trained pooling), or SuperGlobal's GeM+ /
        Regional-GeM in its place at extraction (superglobal_pooling;
        never set by the factory, so training is unchanged).
    """

    backbone: nn.Module
    embedding_dim: int = 512
    pooling: str = "gap"
    neck: str = "dense_swish"
    dropout: float = 0.0
    feature_key: str = "final"
    dtype: Dtype = jnp.float32
    norm: Callable[..., nn.Module] = layers.DEFAULT_NORM
    batch_norm: str = "batch"
    pool_override: superglobal_pooling.PoolingOverride | None = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """Computes the embedding.

        Args:
          x: [batch, height, width, 3] raw pixels in 0..255 (the backbone
            normalises).
          train: training mode (dropout; BatchNorm per `batch_norm`).

        Returns:
          [batch, embedding_dim] float32 embedding, NOT L2-normalised (the head
          and the evaluator normalise). The pooled descriptor is sown as
          `intermediates/pooled`.
        """
        features = self.backbone(x, train=train)
        if self.feature_key not in features:
            raise ValueError(
                f"backbone has no feature map {self.feature_key!r}; available: {sorted(features)}"
            )
        pool = layers.make_pooling(self.pooling, name="pool")
        fmap = features[self.feature_key]
        pooled = pool(fmap) if self.pool_override is None else self.pool_override(fmap, pool)
        self.sow("intermediates", "pooled", pooled)
        pooled = nn.Dropout(self.dropout, deterministic=not train or self.dropout == 0.0)(pooled)
        return layers.EmbeddingNeck(
            features=self.embedding_dim,
            variant=self.neck,
            dtype=self.dtype,
            norm=self.norm,
            batch_norm=self.batch_norm,
            name="neck",
        )(pooled, train=train)
