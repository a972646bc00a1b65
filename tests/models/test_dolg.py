"""DOLG: fusion, attention and atrous module against numpy; the full model on tiny backbones."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from landmark_jax.models import dolg
from landmark_jax.models.backbones import create_backbone

RNG = np.random.default_rng(0)

# rbg keys: XLA compiles threefry-based parameter init ~6x slower on CPU.
KEY = jax.random.key(0, impl="rbg")

# Small heads so every test stays well under a second after compilation.
SMALL = dict(embedding_dim=8, local_dim=16, global_dim=16, branch_channels=8)

# Jitted: run eagerly, each jnp op of a fusion, an attention or an atrous
# module compiles a program of its own per shape (up to 32 per test); jitted,
# one per function and shape. Modules are static arguments (compared by value).
_orthogonal_fusion = jax.jit(dolg.orthogonal_fusion)


@functools.partial(jax.jit, static_argnums=0)
def _apply(module, variables, x):
    return module.apply(variables, x)


def _np_conv(x, kernel, bias, dilation=1):
    """'SAME' stride-1 conv for odd kernels, NHWC/HWIO, float64."""
    kh, kw = kernel.shape[:2]
    ph, pw = dilation * (kh // 2), dilation * (kw // 2)
    xp = np.pad(x.astype(np.float64), ((0, 0), (ph, ph), (pw, pw), (0, 0)))
    h, w = x.shape[1:3]
    out = np.zeros(x.shape[:3] + (kernel.shape[-1],))
    for a in range(kh):
        for b in range(kw):
            patch = xp[:, a * dilation : a * dilation + h, b * dilation : b * dilation + w]
            out += patch @ kernel[a, b]
    return out + bias


def _np_softplus(z):
    return np.log1p(np.exp(z))


def test_orthogonal_fusion_matches_numpy_projection():
    f_l = RNG.normal(size=(2, 3, 4, 5)).astype(np.float32)
    f_g = RNG.normal(size=(2, 5)).astype(np.float32) * 7.0
    fused = np.asarray(_orthogonal_fusion(f_l, f_g))
    assert fused.shape == (2, 3, 4, 10) and fused.dtype == np.float32
    g = f_g[:, None, None, :].astype(np.float64)
    proj = (f_l * g).sum(-1, keepdims=True) / (g * g).sum(-1, keepdims=True) * g
    np.testing.assert_allclose(fused[..., :5], f_l - proj, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(fused[..., 5:], np.broadcast_to(g, f_l.shape), rtol=1e-6)
    # Every fused local vector is orthogonal to its image's global vector.
    cos = (fused[..., :5] * g).sum(-1) / np.linalg.norm(g, axis=-1)
    assert np.abs(cos).max() < 1e-5 * np.abs(f_l).max()


def test_orthogonal_fusion_edge_cases():
    f_l = np.ones((1, 2, 2, 3), np.float32)
    out = np.asarray(_orthogonal_fusion(f_l, np.zeros((1, 3), np.float32)))
    np.testing.assert_array_equal(out[..., :3], f_l)  # nothing to remove, no NaN
    with pytest.raises(ValueError, match="channel"):
        _orthogonal_fusion(f_l, np.ones((1, 4), np.float32))


def test_spatial_attention_matches_numpy():
    x = RNG.normal(size=(2, 3, 3, 6)).astype(np.float32)
    module = dolg.SpatialAttention(channels=4)
    variables = random_variables(module, x)
    stats = {"bn": {"mean": RNG.normal(size=4), "var": RNG.uniform(0.5, 2.0, 4)}}
    variables["batch_stats"] = jax.tree.map(lambda a: a.astype(np.float32), stats)
    variables["params"]["bn"]["scale"] = RNG.uniform(0.5, 2.0, 4).astype(np.float32)
    variables["params"]["bn"]["bias"] = RNG.normal(size=4).astype(np.float32)
    p = variables["params"]
    out, scores = _apply(module, variables, x)

    y = _np_conv(x, p["conv"]["kernel"], p["conv"]["bias"])
    y = (y - stats["bn"]["mean"]) / np.sqrt(stats["bn"]["var"] + 1e-5)
    y = y * p["bn"]["scale"] + p["bn"]["bias"]
    expected_scores = _np_softplus(
        _np_conv(np.maximum(y, 0), p["score"]["kernel"], p["score"]["bias"])
    )
    expected = y / np.linalg.norm(y, axis=-1, keepdims=True) * expected_scores
    np.testing.assert_allclose(scores, expected_scores, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-5)
    assert out.dtype == jnp.float32


@pytest.mark.parametrize("image_pooling", [False, True])
def test_multi_atrous_matches_numpy_and_keeps_size(image_pooling):
    # Dilations larger than the 5x7 map: 'SAME' keeps the size, taps read zeros.
    x = RNG.normal(size=(2, 5, 7, 3)).astype(np.float32)
    module = dolg.MultiAtrousModule(
        dilations=(1, 2, 6), branch_channels=4, out_channels=5, image_pooling=image_pooling
    )
    variables = random_variables(module, x)
    out = _apply(module, variables, x)
    assert out.shape == (2, 5, 7, 5)

    p = jax.tree.map(np.asarray, variables["params"])
    branches = [
        _np_conv(x, p[f"atrous_{i}"]["kernel"], p[f"atrous_{i}"]["bias"], d)
        for i, d in enumerate((1, 2, 6))
    ]
    if image_pooling:
        pooled = x.mean(axis=(1, 2), keepdims=True)
        pooled = np.maximum(_np_conv(pooled, p["image_pool"]["kernel"], p["image_pool"]["bias"]), 0)
        branches.append(np.broadcast_to(pooled, branches[0].shape))
    expected = np.maximum(
        _np_conv(np.concatenate(branches, -1), p["project"]["kernel"], p["project"]["bias"]), 0
    )
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-5)


def test_dolg_rejects_mismatched_dims_and_unknown_branch():
    backbone = create_backbone("resnet_tiny")
    x = np.zeros((1, 32, 32, 3), np.float32)
    with pytest.raises(ValueError, match="local_dim == global_dim"):
        dolg.DOLG(backbone, local_dim=8, global_dim=16).init(KEY, x)
    with pytest.raises(ValueError, match=r"'henkel'.*conv_bn_silu_gem.*gem_fc"):
        dolg.DOLG(backbone, global_branch="henkel").init(KEY, x)


def _images(n, size=64):
    return RNG.uniform(0, 255, (n, size, size, 3)).astype(np.float32)


@functools.cache
def _abstract_variables(model, input_shape):
    """jax.eval_shape of model.init, once per model and input shape: tracing
    a DOLG's init takes up to a second, and two tests build the same model."""
    return jax.eval_shape(model.init, KEY, jax.ShapeDtypeStruct(input_shape, jnp.float32))


def random_variables(model, x, seed=0):
    """The model's variables filled from numpy instead of `model.init`.

    Compiling `init` costs far more than the forward pass on CPU (one RNG
    program per parameter); these tests need sensible values, not Flax's init.
    He-scaled kernels, unit BN scale/variance, GeM p=3, PReLU slope 0.25.
    """
    rng = np.random.default_rng(seed)
    constants = {"var": 1.0, "scale": 1.0, "p": 3.0, "negative_slope": 0.25, "mean": 0.0}

    def fill(path, leaf):
        name = path[-1].key
        if name in constants:
            return np.full(leaf.shape, constants[name], leaf.dtype)
        if leaf.ndim >= 2:
            fan_in = np.prod(leaf.shape[:-1])
            return (rng.normal(size=leaf.shape) * np.sqrt(2.0 / fan_in)).astype(leaf.dtype)
        return (0.1 * rng.normal(size=leaf.shape)).astype(leaf.dtype)

    return jax.tree_util.tree_map_with_path(fill, _abstract_variables(model, x.shape))


# One efficientnet and one resnet configuration, covering both global branches
# and the image-pooling flag.
CASES = {
    "efficientnet_tiny": dict(global_branch="conv_bn_silu_gem", image_pooling=False),
    "resnet_tiny": dict(global_branch="gem_fc", image_pooling=True, dilations=(3, 6, 9)),
}


def _model(backbone_name, dtype=jnp.float32):
    backbone = create_backbone(backbone_name, dtype=dtype)
    return dolg.DOLG(backbone, dtype=dtype, **SMALL, **CASES[backbone_name])


@pytest.mark.parametrize("backbone_name", sorted(CASES))
def test_dolg_on_tiny_backbones_is_orthogonal(backbone_name):
    model = _model(backbone_name)
    x = _images(2)
    variables = random_variables(model, x)
    apply = jax.jit(
        functools.partial(model.apply, train=True, mutable=["batch_stats", "intermediates"])
    )
    out, state = apply(variables, x)
    assert out.shape == (2, 8) and out.dtype == jnp.float32
    assert np.all(np.isfinite(out))
    assert set(state) == {"batch_stats", "intermediates"}
    inter = {k: np.asarray(v[0]) for k, v in state["intermediates"].items()}
    assert inter["local"].shape == (2, 4, 4, 16)  # the stride-16 map of a 64 px image
    assert inter["attention"].shape == (2, 4, 4, 1) and np.all(inter["attention"] > 0)
    g = inter["global"].astype(np.float64)
    perp = inter["fused"][..., :16]
    cos = (perp * g[:, None, None, :]).sum(-1) / np.linalg.norm(g, axis=-1)[:, None, None]
    assert np.abs(cos).max() < 1e-5 * max(1.0, np.abs(inter["local"]).max())
    np.testing.assert_allclose(inter["pooled"][:, 16:], g, rtol=1e-5)


def test_dolg_without_multi_atrous_attends_the_stride_16_map():
    """The official code's default (MODEL.WITH_MA = False): no atrous module;
    the attention reads the backbone's stride-16 map itself."""
    backbone = create_backbone("resnet_tiny")
    model = dolg.DOLG(backbone, **{**SMALL, "global_branch": "gem_fc", "dilations": ()})
    x = _images(2)
    variables = random_variables(model, x)
    assert "local_atrous" not in variables["params"]
    _, state = jax.jit(functools.partial(model.apply, mutable=["intermediates"]))(variables, x)

    def part(variables, name):
        return {k: v[name] for k, v in variables.items() if name in v}

    @jax.jit  # the backbone, then the attention on its map, as one program
    def attend(variables, x):
        maps = backbone.apply(part(variables, "backbone"), x)
        return dolg.SpatialAttention(channels=16).apply(
            part(variables, "local_attention"), maps["stride_16"]
        )

    attended, _ = attend(variables, x)
    np.testing.assert_allclose(state["intermediates"]["local"][0], attended, rtol=1e-5, atol=1e-6)


def test_dolg_bf16_matches_float32():
    model32, model16 = _model("efficientnet_tiny"), _model("efficientnet_tiny", jnp.bfloat16)
    x = _images(2)
    variables = random_variables(model32, x)
    # The bf16 model has the same float32 variables; only compute changes.
    shapes16 = jax.eval_shape(model16.init, KEY, x)
    assert jax.tree.map(lambda a: (a.shape, a.dtype), shapes16) == jax.tree.map(
        lambda a: (a.shape, a.dtype), variables
    )
    out32 = np.asarray(jax.jit(model32.apply)(variables, x))
    out16 = jax.jit(model16.apply)(variables, x)
    assert out16.dtype == jnp.float32
    rel = np.linalg.norm(np.asarray(out16) - out32) / np.linalg.norm(out32)
    assert rel < 0.03, rel  # bf16 has 8 mantissa bits: ~0.4% per rounding


def test_dolg_jit_on_8_device_mesh():
    model = _model("resnet_tiny")
    x = _images(8, size=32)
    variables = random_variables(model, x)
    mesh = Mesh(np.array(jax.devices()), ("data",))
    x_sharded = jax.device_put(x, NamedSharding(mesh, PartitionSpec("data")))
    replicated = jax.device_put(variables, NamedSharding(mesh, PartitionSpec()))

    step = jax.jit(functools.partial(model.apply, train=True, mutable=["batch_stats"]))
    out, updates = step(replicated, x_sharded)
    assert out.shape == (8, 8)
    assert out.sharding.is_equivalent_to(NamedSharding(mesh, PartitionSpec("data")), out.ndim)
    # Sync BN: same result as one device computing the whole batch.
    ref, ref_updates = step(variables, x)  # single-device inputs: whole batch on one device
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), updates, ref_updates
    )
