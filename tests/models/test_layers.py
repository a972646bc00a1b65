"""Pooling and embedding neck against numpy references."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from landmark_jax.models import layers

# Jitted: run eagerly, each jnp op of a pooling or a neck compiles a program
# of its own per shape (about 20 per test); jitted, one per function and shape.
_gem_pool = jax.jit(layers.gem_pool)
_global_avg_pool = jax.jit(layers.global_avg_pool)


@functools.partial(jax.jit, static_argnums=0)
def _init(module, x):
    # rbg keys: XLA compiles threefry-based parameter init ~6x slower on CPU.
    return module.init(jax.random.key(0, impl="rbg"), x)


@functools.partial(jax.jit, static_argnums=0)
def _apply(module, variables, x):
    return module.apply(variables, x)


@functools.partial(jax.jit, static_argnums=0)
def _apply_train(module, variables, x):
    return module.apply(variables, x, train=True, mutable=["batch_stats"])


def _np_gem(x, p, eps=1e-6):
    x = np.maximum(x.astype(np.float64), eps)
    return np.mean(x**p, axis=(1, 2)) ** (1.0 / p)


@pytest.fixture(scope="module")
def fmap():
    # Mixed-sign activations, as after a conv without ReLU: the clamp matters.
    return np.random.default_rng(0).normal(0.5, 1.0, (2, 4, 5, 3)).astype(np.float32)


def test_gem_p1_is_average_pooling(fmap):
    x = np.abs(fmap) + 0.1
    np.testing.assert_allclose(_gem_pool(x, 1.0), x.mean(axis=(1, 2)), rtol=1e-5)
    np.testing.assert_allclose(_global_avg_pool(x), x.mean(axis=(1, 2)), rtol=1e-6)


def test_gem_p3_matches_numpy(fmap):
    np.testing.assert_allclose(_gem_pool(fmap, 3.0), _np_gem(fmap, 3.0), rtol=1e-5)


def test_gem_large_p_approaches_max(fmap):
    x = np.abs(fmap) * 50.0  # large activations would overflow a naive x**p in float32
    out = np.asarray(_gem_pool(x, 200.0))
    expected = x.max(axis=(1, 2))
    assert np.all(np.isfinite(out))
    assert np.all(out <= expected * (1 + 1e-5))
    # mean(x^p)^(1/p) >= max * (1/N)^(1/p) with N = 20 locations.
    np.testing.assert_allclose(out, expected, rtol=0.02)


def test_gem_gradients_are_finite(fmap):
    grads = jax.jit(jax.grad(lambda p, x: layers.gem_pool(x, p).sum(), argnums=(0, 1)))
    x = fmap.copy()
    x[0, 0, 0, 0] = 0.0  # zero and negative inputs are clamped to eps
    for p in (1.0, 3.0, 50.0):
        gp, gx = grads(p, x)
        assert np.isfinite(gp) and np.all(np.isfinite(gx))
    # Finite-difference check of d/dp at p=3 (float64 reference).
    h = 1e-3
    fd = (_np_gem(fmap, 3.0 + h).sum() - _np_gem(fmap, 3.0 - h).sum()) / (2 * h)
    gp, _ = grads(3.0, fmap)
    np.testing.assert_allclose(gp, fd, rtol=1e-3)


def test_gem_module_param_and_bf16(fmap):
    module = layers.GeM()
    variables = _init(module, fmap)
    p = variables["params"]["p"]
    assert p.shape == () and p.dtype == jnp.float32 and float(p) == 3.0
    out = _apply(module, variables, fmap.astype(jnp.bfloat16))
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(out, _np_gem(fmap, 3.0), rtol=2e-2)
    grads = jax.jit(jax.grad(lambda v: module.apply(v, fmap).sum()))(variables)
    assert np.isfinite(grads["params"]["p"])


def test_make_pooling_registry(fmap):
    assert isinstance(layers.make_pooling("gap"), layers.GlobalAvgPool)
    assert isinstance(layers.make_pooling("gem"), layers.GeM)
    with pytest.raises(ValueError, match=r"'avg'.*\['gap', 'gem'\]"):
        layers.make_pooling("avg")


def _np_dense(x, params):
    return x @ np.asarray(params["dense"]["kernel"]) + np.asarray(params["dense"]["bias"])


@pytest.mark.parametrize("variant", sorted(layers.NECKS))
def test_neck_shapes_and_dtype(variant):
    x = np.ones((4, 6), jnp.bfloat16)
    neck = layers.EmbeddingNeck(features=5, variant=variant, dtype=jnp.bfloat16)
    variables = _init(neck, x)
    assert jax.tree.leaves(variables["params"])[0].dtype == jnp.float32
    out = _apply(neck, variables, x)
    assert out.shape == (4, 5) and out.dtype == jnp.float32
    has_bn = "batch_stats" in variables
    assert has_bn == layers.NECKS[variant].use_norm


def test_neck_dense_swish_and_dense_match_numpy():
    x = np.random.default_rng(1).normal(size=(3, 6)).astype(np.float32)
    for variant, act in (("dense", lambda z: z), ("dense_swish", lambda z: z / (1 + np.exp(-z)))):
        neck = layers.EmbeddingNeck(features=4, variant=variant)
        variables = _init(neck, x)
        expected = act(_np_dense(x, variables["params"]))
        np.testing.assert_allclose(_apply(neck, variables, x), expected, rtol=1e-5, atol=1e-6)


def test_neck_dense_bn_prelu_matches_numpy():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(8, 6)).astype(np.float32)
    neck = layers.EmbeddingNeck(features=4, variant="dense_bn_prelu")
    variables = _init(neck, x)
    params = jax.tree.map(np.asarray, variables["params"])
    assert float(params["prelu"]["negative_slope"]) == layers.PRELU_SLOPE_INIT
    slope = 0.3
    params["prelu"]["negative_slope"] = np.float32(slope)
    params["bn"]["scale"] = rng.uniform(0.5, 2.0, 4).astype(np.float32)
    params["bn"]["bias"] = rng.normal(size=4).astype(np.float32)
    stats = {
        "bn": {
            "mean": rng.normal(size=4).astype(np.float32),
            "var": rng.uniform(0.5, 2.0, 4).astype(np.float32),
        }
    }
    variables = {"params": params, "batch_stats": stats}

    def prelu(z):
        return np.where(z >= 0, z, slope * z)

    def bn(z, mean, var):
        return (z - mean) / np.sqrt(var + 1e-5) * params["bn"]["scale"] + params["bn"]["bias"]

    h = _np_dense(x, params)
    # Eval: running statistics.
    expected = prelu(bn(h, stats["bn"]["mean"], stats["bn"]["var"]))
    np.testing.assert_allclose(_apply(neck, variables, x), expected, rtol=1e-4, atol=1e-5)
    # Train: batch statistics (biased variance), running stats updated with momentum 0.9.
    out, updates = _apply_train(neck, variables, x)
    expected = prelu(bn(h, h.mean(0), h.var(0)))
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(
        updates["batch_stats"]["bn"]["mean"],
        0.9 * stats["bn"]["mean"] + 0.1 * h.mean(0),
        rtol=1e-5,
        atol=1e-6,
    )


def test_unknown_neck_lists_valid():
    with pytest.raises(ValueError, match=r"'dense_relu'.*dense_bn_prelu"):
        _init(layers.EmbeddingNeck(features=4, variant="dense_relu"), np.ones((2, 3), np.float32))
