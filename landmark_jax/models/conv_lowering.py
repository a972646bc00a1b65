"""How a model's convolutions are lowered: XLA's convolution, or im2col + matmul.

The same convolution (same kernel, same result up to float summation order)
can reach the compiler two ways:

    xla     `lax.conv_general_dilated`, XLA's own convolution: what TPUs and
            GPUs are built for (MXU / cuDNN).
    im2col  the k x k shifted (strided) views of the padded input concatenated
            along channels, times the kernel reshaped to [k*k*C_in, C_out]: one
            `dot_general`. XLA's CPU backend runs its convolutions, and above
            all their gradients, far below its matmul rate at the demo's small
            maps; as a matmul the same step runs 2.2x faster there (measured on
            2 CPU cores, `resnet_small` at 64 px, batch 32: 73 -> 163 images/s,
            see docs/benchmarks.md). A 3x3 convolution of 256 channels on a
            2x2 map took 43 ms forward as a convolution, 2.9 ms as a matmul.
    auto    im2col on a CPU backend, except depthwise convolutions; xla on any
            other backend (the default).

A depthwise convolution (one filter per channel, EfficientNet's) has no
matmul form; 'im2col' lowers it as the same shifted views weighted channel
by channel and summed, which XLA's CPU backend runs 7-20x faster than its
grouped convolution (forward + backward, EfficientNet-sized maps; an
EfficientNet-B0 step 5.9x). 'auto' leaves depthwise convolutions to XLA: the
weighted views compile about 30% slower, which the test suite's many short
EfficientNet runs pay for and do not win back; a long CPU run of an
EfficientNet should set 'im2col'.

im2col reads the input k*k times into a buffer k*k times its size, which is
why accelerators keep XLA's convolution. Dilated convolutions, other grouped
ones and other layouts always use XLA's.

A model's parameters do not depend on the lowering: a run trained with one
evaluates with the other (`model.conv_lowering` is not part of the weights).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

CONV_LOWERINGS = ("auto", "xla", "im2col")

# lax's dimension numbers of an NHWC input, HWIO kernel and NHWC output: the
# only layout im2col handles (every model here uses it).
_NHWC = lax.conv_dimension_numbers((1, 1, 1, 1), (1, 1, 1, 1), ("NHWC", "HWIO", "NHWC"))


def check_conv_lowering(name: str) -> str:
    """Returns `name` if it is a key of CONV_LOWERINGS.

    Raises:
      ValueError: any other value, listing the valid ones.
    """
    if name not in CONV_LOWERINGS:
        raise ValueError(f"unknown conv_lowering {name!r}; valid: {CONV_LOWERINGS}")
    return name


def conv_general_dilated_for(lowering: str) -> Callable[..., jax.Array] | None:
    """The `conv_general_dilated` a flax `nn.Conv` should use for a lowering.

    Args:
      lowering: a key of CONV_LOWERINGS.

    Returns:
      `im2col_conv_general_dilated` for 'im2col'; for 'auto' on a CPU backend
      the same without the depthwise lowering; None (flax's default, XLA's
      convolution) otherwise.

    Raises:
      ValueError: an unknown lowering.
    """
    check_conv_lowering(lowering)
    if lowering == "im2col":
        return im2col_conv_general_dilated
    if lowering == "auto" and jax.default_backend() == "cpu":
        return functools.partial(im2col_conv_general_dilated, lower_depthwise=False)
    return None


def _pads(
    padding: str | Sequence[tuple[int, int]],
    spatial: Sequence[int],
    window: Sequence[int],
    strides: Sequence[int],
) -> list[tuple[int, int]]:
    if isinstance(padding, str):
        return list(lax.padtype_to_pads(tuple(spatial), tuple(window), tuple(strides), padding))
    return [tuple(p) for p in padding]


def im2col_conv_general_dilated(
    lhs: jax.Array,
    rhs: jax.Array,
    window_strides: Sequence[int],
    padding: str | Sequence[tuple[int, int]],
    lhs_dilation: Sequence[int] | None = None,
    rhs_dilation: Sequence[int] | None = None,
    dimension_numbers: Any = None,
    feature_group_count: int = 1,
    batch_group_count: int = 1,
    precision: Any = None,
    preferred_element_type: Any = None,
    lower_depthwise: bool = True,
) -> jax.Array:
    """`lax.conv_general_dilated` of a 2-D NHWC/HWIO convolution as one matmul.

    Takes lax's signature, so `nn.Conv(conv_general_dilated=...)` can use it.
    A depthwise convolution (groups = input channels = output channels) is
    the weighted sum of the same shifted views instead. Anything else (other
    groupings, dilation, other layouts; depthwise with lower_depthwise=False)
    goes to `lax.conv_general_dilated` unchanged.

    Sums of half-precision products (bf16, fp16) accumulate in float32 and
    are rounded to the result type once, as XLA's convolutions accumulate.

    Returns:
      [N, H_out, W_out, C_out], as lax would return it (its dtype is
      `preferred_element_type`, else the inputs' result type).
    """
    kh, kw, c_in, c_out = rhs.shape if rhs.ndim == 4 else (0, 0, 0, 0)
    lowerable = (
        lhs.ndim == 4
        and batch_group_count == 1
        and all(d == 1 for d in (lhs_dilation or (1, 1)))
        and all(d == 1 for d in (rhs_dilation or (1, 1)))
        and lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers) == _NHWC
    )
    depthwise = (
        lower_depthwise
        and feature_group_count > 1
        and feature_group_count == lhs.shape[-1] == c_out
        and c_in == 1
    )
    if not (lowerable and (feature_group_count == 1 or depthwise)):
        return lax.conv_general_dilated(
            lhs,
            rhs,
            window_strides,
            padding,
            lhs_dilation=lhs_dilation,
            rhs_dilation=rhs_dilation,
            dimension_numbers=dimension_numbers,
            feature_group_count=feature_group_count,
            batch_group_count=batch_group_count,
            precision=precision,
            preferred_element_type=preferred_element_type,
        )
    (top, bottom), (left, right) = _pads(padding, lhs.shape[1:3], (kh, kw), window_strides)
    x = jnp.pad(lhs, ((0, 0), (top, bottom), (left, right), (0, 0)))
    sh, sw = window_strides
    out_h = (x.shape[1] - kh) // sh + 1
    out_w = (x.shape[2] - kw) // sw + 1
    # Row i, column j of the kernel sees x[y*sh + i, x*sw + j] at output (y, x).
    views = [
        lax.slice(
            x,
            (0, i, j, 0),
            (x.shape[0], i + (out_h - 1) * sh + 1, j + (out_w - 1) * sw + 1, x.shape[3]),
            (1, sh, sw, 1),
        )
        for i in range(kh)
        for j in range(kw)
    ]
    result_type = preferred_element_type or jnp.result_type(lhs, rhs)
    # Sums of bf16/fp16 products accumulate in fp32 and round once at the end,
    # as XLA's convolutions do: a bf16 running sum over a 5x5 depthwise
    # kernel's 25 taps had 4x the error (1.3e-2 against 3.6e-3 relative to an
    # fp32 reference, 96 channels). A bf16 x bf16 product is exact in fp32.
    accumulate = (
        jnp.float32
        if jnp.issubdtype(result_type, jnp.floating) and jnp.finfo(result_type).bits < 32
        else preferred_element_type
    )
    if depthwise:
        # One filter per channel: the views weighted channel by channel, summed.
        weights = rhs.reshape(kh * kw, c_out)
        if accumulate is not None:
            weights = weights.astype(accumulate)
            views = [view.astype(accumulate) for view in views]
        out = views[0] * weights[0]
        for view, weight in zip(views[1:], weights[1:], strict=True):
            out = out + view * weight
        return out.astype(result_type)
    # Concatenated in the kernel's (i, j, c_in) order, its reshape matches.
    columns = views[0] if len(views) == 1 else jnp.concatenate(views, axis=-1)
    out = lax.dot_general(
        columns,
        rhs.reshape(kh * kw * c_in, c_out),
        (((3,), (0,)), ((), ())),
        precision=precision,
        preferred_element_type=accumulate,
    )
    return out.astype(result_type)
