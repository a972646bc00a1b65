"""im2col + matmul against XLA's convolution: values, gradients, fallbacks, models."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from landmark_jax.models import conv_lowering, factory

from backbone_variables import random_variables

_NHWC = ("NHWC", "HWIO", "NHWC")


def _lax_conv(x, w, strides, padding):
    return lax.conv_general_dilated(
        x, w, strides, padding, dimension_numbers=_NHWC, precision=lax.Precision.HIGHEST
    )


def _im2col_conv(x, w, strides, padding):
    return conv_lowering.im2col_conv_general_dilated(
        x, w, strides, padding, dimension_numbers=_NHWC, precision=lax.Precision.HIGHEST
    )


@pytest.mark.parametrize(
    "size,kernel,strides,padding",
    [
        ((9, 9), (1, 1), (1, 1), "VALID"),
        ((9, 7), (1, 1), (2, 2), "VALID"),  # ResNet's strided 1x1 (odd sizes)
        ((8, 8), (3, 3), (1, 1), ((1, 1), (1, 1))),
        ((7, 10), (3, 3), (2, 2), "SAME"),  # EfficientNet's stride-2 SAME (asymmetric)
        ((11, 11), (7, 7), (2, 2), ((3, 3), (3, 3))),  # ResNet's stem
        ((6, 5), (3, 2), (1, 3), ((0, 2), (1, 0))),  # non-square everything
        ((2, 2), (3, 3), (1, 1), ((1, 1), (1, 1))),  # a 2x2 map, as at stride 32
    ],
)
def test_im2col_equals_xla_convolution_and_its_gradients(size, kernel, strides, padding):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(2, *size, 5)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(*kernel, 5, 4)), jnp.float32)
    want = jax.jit(_lax_conv, static_argnums=(2, 3))(x, w, strides, padding)
    got = jax.jit(_im2col_conv, static_argnums=(2, 3))(x, w, strides, padding)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)

    cotangent = jnp.asarray(rng.normal(size=want.shape), jnp.float32)

    def gradients(conv):
        return jax.jit(
            jax.grad(lambda a, b: jnp.sum(conv(a, b, strides, padding) * cotangent), (0, 1))
        )

    for g, h in zip(gradients(_im2col_conv)(x, w), gradients(_lax_conv)(x, w), strict=True):
        np.testing.assert_allclose(g, h, rtol=1e-5, atol=1e-4)


def test_hand_computed_strided_convolution():
    # 1 image, 3x3 input 0..8, one 2x2 kernel of ones, stride 2 with one row and
    # column of zero padding after: windows {0,1,3,4}, {2,5}, {6,7}, {8}.
    x = jnp.arange(9.0).reshape(1, 3, 3, 1)
    w = jnp.ones((2, 2, 1, 1))
    got = _im2col_conv(x, w, (2, 2), ((0, 1), (0, 1)))
    np.testing.assert_array_equal(np.asarray(got)[0, :, :, 0], [[8.0, 7.0], [13.0, 8.0]])


@pytest.mark.parametrize(
    "size,kernel,strides,padding",
    [
        ((8, 8), (3, 3), (1, 1), "SAME"),  # EfficientNet's 3x3 depthwise
        ((9, 7), (5, 5), (2, 2), "SAME"),  # its strided 5x5 (asymmetric padding)
    ],
)
def test_depthwise_as_weighted_views_equals_xla_and_its_gradients(size, kernel, strides, padding):
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.normal(size=(2, *size, 6)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(*kernel, 1, 6)), jnp.float32)

    @functools.partial(jax.jit, static_argnums=0)
    def conv(fn, a, b):
        return fn(a, b, strides, padding, dimension_numbers=_NHWC, feature_group_count=6)

    want = conv(lax.conv_general_dilated, x, w)
    np.testing.assert_allclose(
        conv(conv_lowering.im2col_conv_general_dilated, x, w), want, rtol=1e-5, atol=1e-5
    )
    # Without the depthwise lowering ('auto' on a CPU) it is XLA's, exactly.
    unlowered = functools.partial(conv_lowering.im2col_conv_general_dilated, lower_depthwise=False)
    np.testing.assert_array_equal(conv(unlowered, x, w), want)
    cotangent = jnp.asarray(rng.normal(size=want.shape), jnp.float32)

    def gradients(fn):
        return jax.jit(jax.grad(lambda a, b: jnp.sum(conv(fn, a, b) * cotangent), (0, 1)))(x, w)

    for g, h in zip(
        gradients(conv_lowering.im2col_conv_general_dilated),
        gradients(lax.conv_general_dilated),
        strict=True,
    ):
        np.testing.assert_allclose(g, h, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize(
    "kwargs,kernel_in",
    [
        ({"feature_group_count": 2}, 2),  # grouped, not depthwise
        ({"rhs_dilation": (2, 2)}, 4),  # DOLG's atrous branches
    ],
)
def test_other_grouped_and_dilated_convolutions_use_xla(kwargs, kernel_in):
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(2, 9, 9, 4)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(3, 3, kernel_in, 4)), jnp.float32)
    args = (x, w, (1, 1), "SAME")
    want = lax.conv_general_dilated(*args, dimension_numbers=_NHWC, **kwargs)
    got = conv_lowering.im2col_conv_general_dilated(*args, dimension_numbers=_NHWC, **kwargs)
    np.testing.assert_array_equal(got, want)


def test_lowering_choice_and_unknown_name():
    assert conv_lowering.conv_general_dilated_for("xla") is None
    assert (
        conv_lowering.conv_general_dilated_for("im2col")
        is conv_lowering.im2col_conv_general_dilated
    )
    auto = conv_lowering.conv_general_dilated_for("auto")
    assert (auto is not None) == (jax.default_backend() == "cpu")
    if auto is not None:
        # On a CPU, auto lowers dense convolutions and leaves depthwise ones to XLA.
        assert auto.func is conv_lowering.im2col_conv_general_dilated
        assert auto.keywords == {"lower_depthwise": False}
    with pytest.raises(ValueError, match="unknown conv_lowering 'fft'.*'auto', 'xla', 'im2col'"):
        conv_lowering.conv_general_dilated_for("fft")
    with pytest.raises(ValueError, match="model.conv_lowering='fft'"):
        factory.create_model({"name": "global", "backbone": "resnet_tiny", "conv_lowering": "fft"})


def test_a_model_gives_the_same_embedding_and_gradients_either_way():
    """The same variables in both lowerings (the parameters do not depend on
    it), the same embedding and the same parameter gradients.

    BatchNorm uses its moving statistics here: in training mode it would
    normalise the 1x1 stride-32 map over 2 images, which turns rounding
    differences into visible ones whatever computes the convolutions."""
    # EfficientNet: dense (stem, 1x1) and depthwise convolutions both lowered.
    config = {"name": "global", "backbone": "efficientnet_tiny", "embedding_dim": 16}
    xla = factory.create_model({**config, "conv_lowering": "xla"})
    im2col = factory.create_model({**config, "conv_lowering": "im2col"})
    images = jnp.asarray(np.random.default_rng(2).uniform(0, 255, (2, 32, 32, 3)), jnp.float32)
    variables = random_variables(xla, images.shape)
    shapes = jax.eval_shape(im2col.init, jax.random.PRNGKey(0), images)
    assert jax.tree.map(jnp.shape, shapes) == jax.tree.map(jnp.shape, variables)

    def loss(params, model):
        out = model.apply({**variables, "params": params}, images)
        return jnp.sum(out**2), out

    gradients = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1)
    (_, want), grads_want = gradients(variables["params"], xla)
    (_, got), grads_got = gradients(variables["params"], im2col)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    for g, h in zip(jax.tree.leaves(grads_got), jax.tree.leaves(grads_want), strict=True):
        np.testing.assert_allclose(g, h, rtol=1e-4, atol=1e-5 * float(np.abs(np.asarray(h)).max()))


@pytest.mark.parametrize("depthwise", [False, True])
def test_bfloat16_accumulates_in_float32_as_xla_does(depthwise):
    """bf16 inputs: im2col's error against an fp32 reference is no worse than
    XLA's bf16 convolution's (both accumulate in fp32 and round the result once;
    a bf16 running sum over 25 taps was ~4x worse: 1.3e-2 against 3.6e-3)."""
    rng = np.random.default_rng(4)
    channels = 96
    x = jnp.asarray(rng.normal(size=(2, 12, 12, channels)), jnp.bfloat16)
    w = jnp.asarray(rng.normal(size=(5, 5, 1 if depthwise else channels, channels)), jnp.bfloat16)
    groups = channels if depthwise else 1

    def conv(fn, a, b):
        return fn(a, b, (1, 1), "SAME", dimension_numbers=_NHWC, feature_group_count=groups)

    # The reference: the same bf16 values, convolved in fp32 at full precision.
    reference = np.asarray(
        lax.conv_general_dilated(
            x.astype(jnp.float32),
            w.astype(jnp.float32),
            (1, 1),
            "SAME",
            dimension_numbers=_NHWC,
            feature_group_count=groups,
            precision=lax.Precision.HIGHEST,
        )
    )

    def max_relative_error(out):
        assert out.dtype == jnp.bfloat16  # lax's result type for bf16 inputs
        diff = np.abs(np.asarray(out, np.float32) - reference)
        return float(diff.max() / np.abs(reference).max())

    xla_error = max_relative_error(jax.jit(conv, static_argnums=0)(lax.conv_general_dilated, x, w))
    im2col_error = max_relative_error(
        jax.jit(conv, static_argnums=0)(conv_lowering.im2col_conv_general_dilated, x, w)
    )
    # One bf16 rounding of the result is 2^-9 relative at most; allow the
    # last-bit ties a different summation order can flip.
    assert im2col_error <= xla_error * 1.05 + 1e-6, (im2col_error, xla_error)
