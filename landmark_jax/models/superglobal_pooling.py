"""SuperGlobal's improvements to GeM pooling, applied to a trained model at extraction.

Shao, Chen, Karpur, Cui, Araujo and Cao, "Global Features are All You Need
for Image Retrieval and Reranking", ICCV 2023 (arXiv 2308.06954); released
code: github.com/ShihaoShao-GH/SuperGlobal, modules/coarse_retrieval/
gemp.py, rgem.py, sgem.py and relup.py, wired in model/resnet.py and
test/test_utils.py. Four operations without trained parameters that change
how a trained network's descriptor is computed, not its weights:

  * `gem_plus(x, p=4.6, eps=1e-8)`, GeM+ (gemp.py): GeM over the spatial
    positions at a fixed p, mean(max(x, eps)^p)^(1/p), in place of the
    model's own pooling (resnet.py calls it instead of the head's trained
    GeM, whose p it ignores).
  * `regional_gem(x, p=2.5, size=5)`, Regional-GeM (rgem.py): the map
    becomes 0.5 * R(x) + 0.5 * x, where R is an L_p pooling over size x size
    windows at stride 1 of the map reflection-padded by (size - 1) // 2,
    divided by (size^2)^(1/p): nn.LPPool2d's (sum x^p)^(1/p) over a window
    divided so, which is the window's power mean (mean x^p)^(1/p). Applied
    to the final map before the pooling (resnet.py: rgem, then gemp).
  * `scale_gem(descriptors, p=inf)`, Scale-GeM (sgem.py): the descriptors
    of one image at several scales combined. The code's default
    (`infinity=True`) L2-normalises each scale's descriptor and takes the
    element-wise maximum; its finite branch is
    mean_s((d_s - gamma)^p)^(1/p) + gamma with gamma the minimum of the
    stacked descriptors (the code's p default is 10). It acts on the
    model's output descriptor (resnet.py: after its FC; here whichever
    descriptor the run searches with). Without it the code averages the
    scales (resnet.py; scales 0.7071, 1, 1.4142 for its default
    SCALE_LIST = 3).
  * `relu_plus(x, alpha=0.014)`, ReLU+ (relup.py): max(x, alpha), torch's
    clamp(min=alpha), in place of some of a ResNet's ReLUs. In resnet.py
    (with cfg.SupG.relup) these are the output activation of every
    residual block of conv2-conv4 (w_out != 2048; conv5's stay ReLU) and
    the two inner activations of conv2's bottlenecks (w_out == 256); the
    stem's ReLU is untouched. `relu_plus_stages` says which, by stage.

Where this differs from the released code, and why:

  * Regional-GeM's L_p pooling reads max(x, 0): torch's x.pow(2.5) of a
    negative activation is NaN, which the code never meets because its
    ResNet's final map is post-ReLU, but an EfficientNet's map (swish) or
    DOLG's SiLU branch has negative values. The residual half 0.5 * x keeps
    them. For a non-negative map this is the code's value. The code's
    nn.ReflectionPad2d also refuses a map of side <= (size - 1) // 2; here
    such a map is padded by repeated reflection (numpy's 'reflect').
  * Scale-GeM's finite branch takes gamma per image (over scales and
    channels); the code's x.min() is over the whole stacked batch, which is
    the same at the batch size 1 its test loader uses.
  * ReLU+ is applied where relup_=True means it to: with the option off the
    code still clamps conv2's inner activations at 0.014 (BottleneckTransform
    receives the class `relup`, always truthy, instead of the flag), while
    here off leaves every ReLU as trained.

This follows the released code throughout: the defaults above are the
code's, and the paper's section on these modules (Sec. 3) was not at hand
when this was written, so no formula here is taken from it; a difference
between the paper and the code found later is to be resolved toward the
code, as superglobal re-ranking (retrieval/rerank.py) is.

Pooling and normalisation math runs in float32, as in layers.py.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from landmark_jax.models import layers

# The released code's defaults (gemp.py, rgem.py, sgem.py, resnet.py).
GEM_PLUS_P = 4.6
GEM_PLUS_EPS = 1e-8
REGIONAL_GEM_P = 2.5
REGIONAL_GEM_SIZE = 5
SCALE_GEM_P = math.inf  # sgem(infinity=True); the finite branch's own default is 10
RELU_PLUS_ALPHA = 0.014


def gem_plus(x: jax.Array, p: float = GEM_PLUS_P, eps: float = GEM_PLUS_EPS) -> jax.Array:
    """GeM+: GeM at a fixed exponent, mean over positions of max(x, eps)^p, to the 1/p.

    layers.gem_pool's computation (rescaled by the per-channel maximum so
    x^p cannot overflow; the same value).

    Args:
      x: [batch, height, width, channels] feature map (any float dtype).
      p: the exponent (> 0); the code's 4.6.
      eps: the lower clamp; the code's 1e-8.

    Returns:
      [batch, channels] float32 array.
    """
    return layers.gem_pool(x, p, eps)


def regional_gem(
    x: jax.Array, p: float = REGIONAL_GEM_P, size: int = REGIONAL_GEM_SIZE
) -> jax.Array:
    """Regional-GeM: 0.5 * (power mean of each size x size window) + 0.5 * x.

    The window around each position of the map reflection-padded by
    (size - 1) // 2, so the output has the input's shape; negative
    activations count as 0 in the window's power mean (see the module
    docstring).

    Args:
      x: [batch, height, width, channels] feature map (any float dtype).
      p: the windows' exponent (> 0); the code's 2.5.
      size: the window side, odd; the code's 5.

    Returns:
      [batch, height, width, channels] float32 map.

    Raises:
      ValueError: an even or non-positive size (the code's sum would not
        line up with the map).
    """
    if size < 1 or size % 2 == 0:
        raise ValueError(f"regional_gem size={size}: expected an odd window side >= 1")
    x = x.astype(jnp.float32)
    pad = (size - 1) // 2
    padded = _reflect_pad(_reflect_pad(x, pad, axis=1), pad, axis=2)
    window_sum = jax.lax.reduce_window(
        jnp.maximum(padded, 0.0) ** p, 0.0, jax.lax.add, (1, size, size, 1), (1, 1, 1, 1), "VALID"
    )
    return 0.5 * (window_sum / (size * size)) ** (1.0 / p) + 0.5 * x


def _reflect_pad(x: jax.Array, pad: int, axis: int) -> jax.Array:
    """jnp.pad(mode='reflect') along one axis, as a gather whose indices are
    computed from the axis size: it also lowers where that size is symbolic
    (the SavedModel export's images of any size), which jnp.pad's reflect
    does not. Repeated reflection where pad >= the size, as numpy's."""
    last = jnp.asarray(x.shape[axis], jnp.int32) - 1
    offsets = jnp.abs(jnp.arange(x.shape[axis] + 2 * pad) - pad) % jnp.maximum(2 * last, 1)
    return jnp.take(x, jnp.where(offsets <= last, offsets, 2 * last - offsets), axis=axis)


def scale_gem(descriptors: Any, p: float = SCALE_GEM_P, xp: Any = jnp) -> Any:
    """Scale-GeM: one descriptor per image from its descriptors at several scales.

    p = inf (the code's default): the element-wise maximum of the
    L2-normalised descriptors (normalised as torch F.normalize,
    layers.l2_normalize_rows). Finite p: mean_s((d_s - gamma)^p)^(1/p) +
    gamma, gamma each image's minimum over its scales and channels, on the
    descriptors as given.

    Args:
      descriptors: [scales, batch, dim] array.
      p: math.inf, or a finite exponent > 0.
      xp: the array module, jax.numpy or numpy (a split's descriptors on the
        host).

    Returns:
      [batch, dim] array, not normalised (callers normalise, as the code's
      extract_feature does).
    """
    if math.isinf(p):
        return xp.max(layers.l2_normalize_rows(descriptors, xp), axis=0)
    gamma = xp.min(descriptors, axis=(0, 2), keepdims=True)
    combined = xp.mean((descriptors - gamma) ** p, axis=0) ** (1.0 / p)
    return combined + gamma[0]


def relu_plus(x: jax.Array, alpha: float = RELU_PLUS_ALPHA) -> jax.Array:
    """ReLU+: max(x, alpha) (torch clamp(min=alpha)), in x's dtype.

    Args:
      x: any array.
      alpha: the floor; the code's 0.014.

    Returns:
      An array of x's shape and dtype.
    """
    return jnp.maximum(x, jnp.asarray(alpha, x.dtype))


def relu_plus_stages(num_stages: int) -> tuple[tuple[bool, bool], ...]:
    """Which activations of a ResNet's stages ReLU+ replaces (model/resnet.py).

    Args:
      num_stages: the backbone's bottleneck stages (4: conv2-conv5).

    Returns:
      One (inner, output) pair per stage: `inner` the two activations inside
      each bottleneck (conv2's only), `output` the block's output activation
      (every stage but the last).
    """
    return tuple((i == 0, i < num_stages - 1) for i in range(num_stages))


@dataclasses.dataclass(frozen=True)
class PoolingOverride:
    """GeM+ and Regional-GeM at a model's pooling site (GlobalModel, DOLG's global branch).

    Attributes:
      gem_plus_p: GeM+'s p, or None to keep the model's trained pooling.
      regional_gem_p: Regional-GeM's p, or None for no Regional-GeM.
      regional_gem_size: Regional-GeM's window side.
    """

    gem_plus_p: float | None = None
    regional_gem_p: float | None = None
    regional_gem_size: int = REGIONAL_GEM_SIZE

    def __call__(self, x: jax.Array, trained_pool: Callable[[jax.Array], jax.Array]) -> jax.Array:
        """Pools a map: Regional-GeM (if set), then GeM+ (if set) or the trained pooling.

        Args:
          x: [batch, height, width, channels] feature map.
          trained_pool: the model's own pooling module.

        Returns:
          [batch, channels] float32 descriptor.
        """
        if self.regional_gem_p is not None:
            x = regional_gem(x, self.regional_gem_p, self.regional_gem_size)
        if self.gem_plus_p is not None:
            return gem_plus(x, self.gem_plus_p)
        return trained_pool(x)
