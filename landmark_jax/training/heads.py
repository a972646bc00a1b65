"""Cosine-softmax classification heads: sub-center cosine, margins, AdaCos scale.

The head turns an embedding into per-class logits in three separable steps,
so that every recipe is a choice of names rather than a code path:

    cosine = CosineClassifier(...)(embeddings)        # [B, C_padded], float32
    scale  = compute_scale(scale_mode, cosine, ...)   # SCALE_MODES
    logits = margin_logits(cosine, labels,            # MARGIN_TYPES
                           margin_type=..., margin=..., scale=scale)

GLR2020 1st place: k=1, scale 'adacos_dynamic', margin 'none'.
GLR2021 1st place: k=3 (sub-center ArcFace), scale 'fixed' (s=45), margin
'arcface' with per-class dynamic margins (`losses.dynamic_margins`, indexed by
label and passed per sample).

Padded classes. The class dimension of a large head (203,094 classes, 104M
parameters) is sharded across devices, so it is padded: the trainer pads
every head to a multiple of 1024 classes (`head_sharding.portable_num_classes`,
which any device count dividing 1024 splits evenly, so a checkpoint restores
on 1 CPU or a 128-chip pod alike). The classifier sets the
cosine of every padded class (index >= num_classes) to `PADDED_COSINE` (-1e9):
any logit made from it by a positive scale is at most -1e9 * s, whose exp
underflows to exactly 0 in float32, so padded classes never carry softmax mass,
never win an argmax or top-k, and receive zero gradient. The value is finite
on purpose: -inf would turn `0 * x` and d(logit)/d(scale) into NaN.
`margin_logits` leaves non-target columns unclipped so the sentinel survives;
labels must be < num_classes.

Sharding. `head_sharding` pads and splits the class dimension across devices;
set `CosineClassifier.mesh` so the embeddings are all-gathered (small) rather
than the kernel (large).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from landmark_jax.models import layers
from landmark_jax.runtime.sharding import DATA_AXIS

Dtype = Any

KERNEL_KEY = "kernel"

# Cosine given to padded classes; see the module docstring for why it is finite.
PADDED_COSINE = -1e9

# AdaCos (GLR2020 code) clips cosines to this before arccos.
_ACOS_CLIP = 1.0 - 1e-7


def _uniform_bound(name: str, dim: int, num_columns: int) -> float:
    """The bound b of a head init uniform(-b, b) for a [dim, num_columns] kernel."""
    if name == "uniform_fan_in":
        return 1.0 / math.sqrt(dim)
    return math.sqrt(6.0 / (dim + num_columns))


# The head kernel's initialisation (`config.head.init`), uniform(-b, b) with:
#   uniform_fan_in  b = 1/sqrt(D): PyTorch's reset_parameters of Henkel's
#                   ArcMarginProduct_subcenter (GLR2021);
#   glorot_uniform  b = sqrt(6 / (D + C*k)): Keras's default for
#                   `add_variable` without an initializer, which the GLR2020
#                   head ArcMarginProduct_v2 uses ([512, C]).
# It matters: the cosine head's angular step scales like lr / ||w||^2, and at
# C = 203,094 the glorot columns are about 8x shorter (norm 0.07 vs 0.58), so
# under the same SGD lr a fan-in head learns its directions ~66x slower.
# C*k counts the real classes: padding the class dimension for sharding does
# not change the init.
HEAD_INITS = ("uniform_fan_in", "glorot_uniform")


class CosineClassifier(nn.Module):
    """Cosine similarity to (sub-center) class weight vectors, no bias.

    cosine[b, c] = max_j <x_b / |x_b|, w_{c,j} / |w_{c,j}|> over the k
    sub-centers j of class c (sub-center ArcFace; k=1 is the plain cosine head).

    Attributes:
      num_classes: real number of classes C.
      num_subcenters: k, weight vectors per class.
      param_dtype: dtype of the kernel.
      num_classes_padded: C_padded >= C, the kernel's class count (see
        `head_sharding.padded_num_classes`); None means C. Classes >= C get `PADDED_COSINE`.
      dtype: dtype of the normalised operands of the matmul (float32 by
        default; bfloat16 halves its memory traffic). Accumulation and the
        output are always float32.
      precision: matmul precision (e.g. 'highest' for full float32 on TPU,
        whose default multiplies float32 in bfloat16 passes); None: jax default.
      mesh: when set, the embeddings are constrained to be replicated and the
        cosine to be class-sharded (P(None, 'data')) on this mesh, so XLA
        gathers the small [B, D] embeddings instead of the class-sharded kernel.
        Leave None for an unsharded head.
    """

    num_classes: int
    num_subcenters: int = 1
    param_dtype: Dtype = jnp.float32
    num_classes_padded: int | None = None
    dtype: Dtype = jnp.float32
    precision: str | jax.lax.Precision | None = None
    mesh: Mesh | None = None
    kernel_init: str = "uniform_fan_in"

    @property
    def padded_classes(self) -> int:
        """C_padded: the number of class columns in the kernel and output."""
        return self.num_classes if self.num_classes_padded is None else self.num_classes_padded

    @nn.compact
    def __call__(self, embeddings: jax.Array) -> jax.Array:
        """Computes class cosines.

        Args:
          embeddings: [B, D] array (any float dtype; need not be normalised).

        Returns:
          [B, C_padded] float32 cosines in [-1, 1] for real classes and
          `PADDED_COSINE` for padded ones.

        Raises:
          ValueError: num_classes < 1, num_subcenters < 1,
            num_classes_padded < num_classes, or an unknown kernel_init.
        """
        if self.num_classes < 1 or self.num_subcenters < 1:
            raise ValueError(
                f"num_classes={self.num_classes} and num_subcenters={self.num_subcenters} "
                "must be >= 1"
            )
        padded = self.padded_classes
        if padded < self.num_classes:
            raise ValueError(
                f"num_classes_padded={padded} is smaller than num_classes={self.num_classes}"
            )
        if self.kernel_init not in HEAD_INITS:
            raise ValueError(f"unknown head init {self.kernel_init!r}; valid: {HEAD_INITS}")
        k = self.num_subcenters
        dim = embeddings.shape[-1]
        bound = _uniform_bound(self.kernel_init, dim, self.num_classes * k)

        def init(key: jax.Array, shape: tuple[int, ...], dtype: Dtype) -> jax.Array:
            return jax.random.uniform(key, shape, dtype, -bound, bound)

        # Class-major columns (class c's sub-centers at c*k .. c*k+k-1): a shard
        # of whole classes along the last axis holds all their sub-centers.
        kernel = self.param(KERNEL_KEY, init, (dim, padded * k), self.param_dtype)

        x = embeddings.astype(jnp.float32)
        if self.mesh is not None:
            x = jax.lax.with_sharding_constraint(x, NamedSharding(self.mesh, P()))
        x = layers.l2_normalize(x, axis=-1).astype(self.dtype)
        w = layers.l2_normalize(kernel.astype(jnp.float32), axis=0).astype(self.dtype)
        cos = jnp.matmul(x, w, precision=self.precision, preferred_element_type=jnp.float32)
        if self.mesh is not None:
            cos = jax.lax.with_sharding_constraint(
                cos, NamedSharding(self.mesh, P(None, DATA_AXIS))
            )
        cos = jnp.max(cos.reshape(cos.shape[0], padded, k), axis=-1)
        if padded > self.num_classes:
            is_real = jnp.arange(padded) < self.num_classes
            cos = jnp.where(is_real[None, :], cos, PADDED_COSINE)
        return cos


# ----------------------------------------------------------------------------
# Margins.


def _target_cosine(cosine: jax.Array, onehot: jax.Array) -> jax.Array:
    """cosine[b, labels[b]] as a masked reduction.

    A reduction over the class axis partitions into a per-device partial sum
    plus one [B] all-reduce when classes are sharded; a gather might not.
    """
    return jnp.sum(jnp.where(onehot, cosine, 0.0), axis=-1)


def _safe_sine(c: jax.Array) -> jax.Array:
    """sqrt(1 - c^2) for c in [-1, 1], with gradient 0 (not NaN) at |c| = 1."""
    sin_sq = 1.0 - c * c
    positive = sin_sq > 0.0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, sin_sq, 1.0)), 0.0)


def _no_margin(cos_y: jax.Array, m: jax.Array, easy_margin: bool) -> jax.Array:
    del m, easy_margin
    return cos_y


def _cosface(cos_y: jax.Array, m: jax.Array, easy_margin: bool) -> jax.Array:
    del easy_margin
    return cos_y - m


def _arcface(cos_y: jax.Array, m: jax.Array, easy_margin: bool) -> jax.Array:
    c = jnp.clip(cos_y, -1.0, 1.0)
    phi = c * jnp.cos(m) - _safe_sine(c) * jnp.sin(m)  # cos(theta + m)
    if easy_margin:
        return jnp.where(c > 0.0, phi, c)
    # Past theta = pi - m, cos(theta + m) would increase again with theta;
    # the reference continues linearly instead (GLR2021 / InsightFace).
    threshold = jnp.cos(jnp.pi - m)
    return jnp.where(c > threshold, phi, c - jnp.sin(jnp.pi - m) * m)


# Each maps (target cosine [B], margin [B], easy_margin) to the target logit / s.
_MARGIN_FNS: dict[str, Callable[[jax.Array, jax.Array, bool], jax.Array]] = {
    "none": _no_margin,
    "cosface": _cosface,
    "arcface": _arcface,
}
MARGIN_TYPES = tuple(_MARGIN_FNS)


def check_margin_type(margin_type: str) -> str:
    """Returns `margin_type` if it names a margin.

    Raises:
      ValueError: unknown name; the message lists MARGIN_TYPES.
    """
    if margin_type not in _MARGIN_FNS:
        raise ValueError(f"unknown margin_type {margin_type!r}; valid: {', '.join(MARGIN_TYPES)}")
    return margin_type


def margin_logits(
    cosine: jax.Array,
    labels: jax.Array,
    *,
    margin_type: str,
    margin: float | jax.Array = 0.0,
    scale: float | jax.Array,
    easy_margin: bool = False,
) -> jax.Array:
    """Scaled logits with an additive margin on the target class.

    logits = s * (onehot * phi(cos_y) + (1 - onehot) * cos), where phi is
      none:     cos
      cosface:  cos - m
      arcface:  cos(theta + m) = cos*cos(m) - sin*sin(m) where cos > cos(pi - m),
                else cos - sin(pi - m) * m  (GLR2021 reference threshold);
                with easy_margin: cos(theta + m) where cos > 0, else cos.
    The target cosine is clipped to [-1, 1] before the square root; non-target
    columns are used unclipped, so padded classes keep `PADDED_COSINE`.

    Args:
      cosine: [B, C] cosines (from `CosineClassifier`).
      labels: [B] int target classes, all < the real number of classes.
      margin_type: one of MARGIN_TYPES.
      margin: m, a float or a per-sample [B] array (per-class dynamic margins:
        pass margins[labels]). Ignored for 'none'.
      scale: s, a float or scalar array (see `compute_scale`).
      easy_margin: ArcFace only: the easy-margin variant instead of the
        threshold.

    Returns:
      [B, C] float32 logits.

    Raises:
      ValueError: unknown margin_type.
    """
    fn = _MARGIN_FNS[check_margin_type(margin_type)]
    cosine = cosine.astype(jnp.float32)
    num_cols = cosine.shape[-1]
    onehot = labels[:, None] == jnp.arange(num_cols)[None, :]
    m = jnp.broadcast_to(jnp.asarray(margin, jnp.float32), labels.shape)
    target = fn(_target_cosine(cosine, onehot), m, easy_margin)
    # where, not onehot * phi + (1 - onehot) * cos: same values, no 0 * x.
    logits = jnp.where(onehot, target[:, None], cosine)
    return jnp.asarray(scale, jnp.float32) * logits


# ----------------------------------------------------------------------------
# Scale.


def adacos_fixed_scale(num_classes: int) -> float:
    """Fixed AdaCos scale sqrt(2) * ln(C - 1) (15.99 for 81,313; 17.28 for 203,094).

    Args:
      num_classes: C, real (unpadded) number of classes.

    Returns:
      The scale as a Python float.

    Raises:
      ValueError: C < 3 (the scale would be <= 0).
    """
    if num_classes < 3:
        raise ValueError(f"AdaCos needs num_classes >= 3 (got {num_classes}): ln(C - 1) <= 0")
    return math.sqrt(2.0) * math.log(num_classes - 1)


def _masked_median_nearest(x: jax.Array, valid: jax.Array) -> jax.Array:
    """Median of x[valid] as tfp.stats.percentile(q=50) (interpolation 'nearest').

    That picks sorted[round((n - 1) / 2)] with round-half-to-even, which
    jnp.round also uses, so the even-n tie goes the same way as the reference.
    """
    n = jnp.sum(valid.astype(jnp.int32))
    ordered = jnp.sort(jnp.where(valid, x, jnp.inf))
    idx = jnp.round((n - 1).astype(jnp.float32) * 0.5).astype(jnp.int32)
    return ordered[jnp.clip(idx, 0, x.shape[0] - 1)]


def adacos_dynamic_scale(
    cosine: jax.Array,
    labels: jax.Array,
    num_classes: int,
    *,
    s0: float | None = None,
    valid_mask: jax.Array | None = None,
) -> jax.Array:
    """Per-batch AdaCos scale of the GLR2020 code, with no gradient.

    B_avg = mean_b sum_{j != y_b} exp(s0 * cos_bj),
    theta_med = median_b arccos(cos_{b, y_b}),
    s = ln(B_avg) / cos(min(pi/4, theta_med)).

    The reference computed this per TPU replica (a local batch of 4-8); here
    it is over the global batch the function is given.

    Args:
      cosine: [B, C_padded] cosines.
      labels: [B] int target classes.
      num_classes: real C; columns >= C are excluded from B_avg.
      s0: scale inside B_avg; default `adacos_fixed_scale(num_classes)`.
      valid_mask: [B] bool, False for padded rows (excluded from the mean and
        the median); None: all rows valid.

    Returns:
      Scalar float32 scale (stop-gradient).

    Raises:
      ValueError: num_classes < 3 when s0 is None.
    """
    s0 = adacos_fixed_scale(num_classes) if s0 is None else s0
    cosine = jax.lax.stop_gradient(cosine.astype(jnp.float32))
    num_rows, num_cols = cosine.shape
    valid = jnp.ones((num_rows,), bool) if valid_mask is None else valid_mask.astype(bool)
    cols = jnp.arange(num_cols)[None, :]
    onehot = labels[:, None] == cols
    others = jnp.where(onehot | (cols >= num_classes), 0.0, jnp.exp(s0 * cosine))
    per_row = jnp.sum(others, axis=-1)
    num_valid = jnp.maximum(jnp.sum(valid.astype(jnp.float32)), 1.0)
    b_avg = jnp.sum(jnp.where(valid, per_row, 0.0)) / num_valid
    cos_y = jnp.clip(_target_cosine(cosine, onehot), -_ACOS_CLIP, _ACOS_CLIP)
    theta_med = _masked_median_nearest(jnp.arccos(cos_y), valid)
    scale = jnp.log(b_avg) / jnp.cos(jnp.minimum(jnp.pi / 4, theta_med))
    return jax.lax.stop_gradient(scale)


SCALE_MODES = ("fixed", "adacos_fixed", "adacos_dynamic")


def check_scale_mode(scale_mode: str) -> str:
    """Returns `scale_mode` if it names a scale mode.

    Raises:
      ValueError: unknown name; the message lists SCALE_MODES.
    """
    if scale_mode not in SCALE_MODES:
        raise ValueError(f"unknown scale mode {scale_mode!r}; valid: {', '.join(SCALE_MODES)}")
    return scale_mode


def compute_scale(
    scale_mode: str,
    *,
    num_classes: int,
    scale: float | None = None,
    cosine: jax.Array | None = None,
    labels: jax.Array | None = None,
    valid_mask: jax.Array | None = None,
) -> float | jax.Array:
    """The logit scale s for a scale mode.

    Args:
      scale_mode: 'fixed' (returns `scale`), 'adacos_fixed'
        (sqrt(2) ln(C - 1)) or 'adacos_dynamic' (per batch, see
        `adacos_dynamic_scale`).
      num_classes: real C.
      scale: the fixed scale; required for 'fixed', ignored otherwise.
      cosine: [B, C_padded] cosines; required for 'adacos_dynamic'.
      labels: [B] targets; required for 'adacos_dynamic'.
      valid_mask: [B] row mask for 'adacos_dynamic'.

    Returns:
      A Python float, or a scalar float32 array for 'adacos_dynamic'.

    Raises:
      ValueError: unknown scale_mode (lists SCALE_MODES), or a required
        argument is missing.
    """
    check_scale_mode(scale_mode)
    if scale_mode == "fixed":
        if scale is None:
            raise ValueError("scale_mode 'fixed' needs a scale (e.g. 45 for GLR2021 ArcFace)")
        return float(scale)
    if scale_mode == "adacos_fixed":
        return adacos_fixed_scale(num_classes)
    if cosine is None or labels is None:
        raise ValueError("scale_mode 'adacos_dynamic' needs the batch's cosine and labels")
    return adacos_dynamic_scale(cosine, labels, num_classes, valid_mask=valid_mask)
