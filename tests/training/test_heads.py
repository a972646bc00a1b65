"""Cosine heads, margins, AdaCos scales and the class-sharded head, against numpy."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from landmark_jax.training import head_sharding, heads, losses

# ---------------------------------------------------------------------------
# numpy references, written from the recipes' formulas.


def np_normalize(x, axis):
    return x / np.maximum(np.linalg.norm(x, axis=axis, keepdims=True), 1e-12)


def np_cosine(x, kernel, num_classes, k):
    """Class-major sub-centers: column c*k + j is sub-center j of class c."""
    cos = np_normalize(x, 1) @ np_normalize(kernel, 0)
    cos = cos.reshape(x.shape[0], -1, k).max(-1)
    cos[:, num_classes:] = heads.PADDED_COSINE
    return cos


def np_margin_logits(cos, labels, margin_type, m, s, easy_margin=False):
    cos = cos.astype(np.float64)
    m = np.broadcast_to(np.asarray(m, np.float64), labels.shape)
    out = cos.copy()
    for i, y in enumerate(labels):
        c = min(max(cos[i, y], -1.0), 1.0)
        if margin_type == "cosface":
            out[i, y] = c - m[i]
        elif margin_type == "arcface":
            phi = c * math.cos(m[i]) - math.sqrt(1 - c * c) * math.sin(m[i])
            if easy_margin:
                out[i, y] = phi if c > 0 else c
            elif c > math.cos(math.pi - m[i]):
                out[i, y] = phi
            else:
                out[i, y] = c - math.sin(math.pi - m[i]) * m[i]
    return s * out


def np_adacos_scale(cos, labels, num_classes, valid):
    s0 = math.sqrt(2) * math.log(num_classes - 1)
    rows = np.flatnonzero(valid)
    b = [sum(math.exp(s0 * cos[i, j]) for j in range(num_classes) if j != labels[i]) for i in rows]
    theta = np.sort(np.arccos(np.clip(cos[rows, labels[rows]], -1 + 1e-7, 1 - 1e-7)))
    theta_med = theta[int(np.round((len(rows) - 1) / 2))]  # tfp 'nearest'
    return math.log(np.mean(b)) / math.cos(min(math.pi / 4, theta_med))


# Jitted entry points. Run eagerly, each jnp op of a head, a margin or a
# scale compiles a program of its own per shape (20-38 per test); jitted, a
# test compiles one program per function and shape. Modules are static
# arguments (frozen dataclasses, compared by value), so equal heads share one.


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _init(module, seed, impl, x):
    """module.init's params with jax.random.key(seed, impl=impl)."""
    return module.init(jax.random.key(seed, impl=impl), x)["params"]


@functools.partial(jax.jit, static_argnums=0)
def _apply(module, params, x):
    return module.apply({"params": params}, x)


_margin_logits = jax.jit(
    heads.margin_logits, static_argnames=("margin_type", "scale", "easy_margin")
)


def init_head(num_classes, k, dim, padded=None, seed=0):
    clf = heads.CosineClassifier(num_classes, num_subcenters=k, num_classes_padded=padded)
    params = _init(clf, seed, "rbg", np.zeros((1, dim), np.float32))
    return clf, params


# ---------------------------------------------------------------------------
# CosineClassifier.


def test_cosine_classifier_matches_numpy_subcenters_and_padding():
    clf, params = init_head(num_classes=5, k=3, dim=6, padded=8)
    kernel = np.asarray(params["kernel"])
    assert kernel.shape == (6, 8 * 3)
    assert np.abs(kernel).max() <= 1 / math.sqrt(6)
    x = np.random.default_rng(0).normal(size=(4, 6)).astype(np.float32)
    cos = np.asarray(_apply(clf, params, x))
    assert cos.dtype == np.float32 and cos.shape == (4, 8)
    np.testing.assert_allclose(cos, np_cosine(x, kernel, 5, 3), atol=1e-6)
    assert np.all(np.abs(cos[:, :5]) <= 1 + 1e-6)


def test_padded_classes_never_win_and_leave_softmax_unchanged():
    dim, k = 4, 2
    clf_p, params = init_head(num_classes=3, k=k, dim=dim, padded=8)
    clf_u = heads.CosineClassifier(3, num_subcenters=k)
    x = np.random.default_rng(1).normal(size=(5, dim)).astype(np.float32)
    kernel = np.asarray(params["kernel"]).copy()
    kernel[:, 3 * k :] = np.repeat(x[0][:, None], 5 * k, axis=1)  # a perfect padded match
    labels = jnp.array([0, 1, 2, 0, 1])

    @functools.partial(jax.jit, static_argnums=0)
    def softmax_and_loss(clf, kernel):
        cos = clf.apply({"params": {"kernel": kernel}}, x)
        out = {}
        for margin_type in heads.MARGIN_TYPES:
            logits = heads.margin_logits(
                cos, labels, margin_type=margin_type, margin=0.3, scale=0.5
            )
            loss, _ = losses.weighted_cross_entropy(logits, labels)
            out[margin_type] = (jax.nn.softmax(logits), jnp.argmax(logits, -1), loss)
        return out

    padded_out = softmax_and_loss(clf_p, kernel)
    unpadded_out = softmax_and_loss(clf_u, kernel[:, : 3 * k])
    for margin_type in heads.MARGIN_TYPES:
        prob_p, argmax_p, loss_p = padded_out[margin_type]
        prob_u, _, loss_u = unpadded_out[margin_type]
        np.testing.assert_array_equal(np.asarray(prob_p)[:, 3:], 0.0)
        np.testing.assert_allclose(np.asarray(prob_p)[:, :3], prob_u, rtol=1e-6)
        assert np.all(np.asarray(argmax_p) < 3)
        np.testing.assert_allclose(loss_p, loss_u, rtol=1e-6)


@pytest.mark.parametrize(
    ("init", "bound"),
    [
        ("uniform_fan_in", 1 / math.sqrt(64)),  # PyTorch: U(+-1/sqrt(in_features))
        ("glorot_uniform", math.sqrt(6 / (64 + 900 * 3))),  # Keras on [D, C*k], real C
    ],
)
def test_head_inits_follow_their_definitions(init, bound):
    head = heads.CosineClassifier(
        num_classes=900, num_subcenters=3, num_classes_padded=1024, kernel_init=init
    )
    kernel = np.asarray(
        _init(head, 0, "threefry2x32", np.zeros((1, 64), np.float32))[heads.KERNEL_KEY]
    )
    assert kernel.shape == (64, 1024 * 3)
    assert 0.99 * bound < np.abs(kernel).max() <= bound
    # Uniform(-b, b) has variance b^2/3: column norms about sqrt(D/3) b.
    norms = np.linalg.norm(kernel, axis=0)
    assert np.mean(norms) == pytest.approx(math.sqrt(64 / 3) * bound, rel=0.02)
    with pytest.raises(ValueError, match=r"'xavier'.*glorot_uniform"):
        _init(
            heads.CosineClassifier(num_classes=4, kernel_init="xavier"),
            0,
            "threefry2x32",
            np.zeros((1, 8), np.float32),
        )


def test_classifier_rejects_bad_sizes():
    with pytest.raises(ValueError, match="smaller than num_classes"):
        init_head(num_classes=5, k=1, dim=3, padded=4)


# ---------------------------------------------------------------------------
# Margins.

# Target cosines chosen to hit every branch: 0.95 (phi), -0.2 (easy-margin
# fallback), -0.99 (< cos(pi - m) for m >= 0.15: the threshold branch), +-1.
TARGET_COS = np.array([0.95, -0.2, -0.99, 1.0, -1.0, 0.3], np.float32)


def _cosines(num_classes=7, seed=2):
    rng = np.random.default_rng(seed)
    cos = rng.uniform(-1, 1, size=(len(TARGET_COS), num_classes)).astype(np.float32)
    labels = rng.integers(0, num_classes, size=len(TARGET_COS))
    cos[np.arange(len(labels)), labels] = TARGET_COS
    return cos, labels


@pytest.mark.parametrize(
    "margin_type,easy_margin",
    [("none", False), ("cosface", False), ("arcface", False), ("arcface", True)],
)
@pytest.mark.parametrize("per_sample", [False, True])
def test_margin_logits_match_numpy(margin_type, easy_margin, per_sample):
    cos, labels = _cosines()
    m = np.linspace(0.05, 0.5, len(labels)).astype(np.float32) if per_sample else 0.35
    got = _margin_logits(
        cos,
        labels,
        margin_type=margin_type,
        margin=jnp.asarray(m),
        scale=30.0,
        easy_margin=easy_margin,
    )
    assert got.dtype == jnp.float32
    want = np_margin_logits(cos, labels, margin_type, m, 30.0, easy_margin)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)


def test_arcface_threshold_branch_by_hand():
    # m = 0.5: cos(pi - 0.5) = -0.8776 > -0.99, so the target logit is
    # s * (-0.99 - sin(0.5) * 0.5) = 2 * (-0.99 - 0.23971) = -2.45943.
    logits = _margin_logits(
        jnp.array([[-0.99, 0.1]]), jnp.array([0]), margin_type="arcface", margin=0.5, scale=2.0
    )
    np.testing.assert_allclose(logits, [[-2.459426, 0.2]], rtol=1e-5)


@pytest.mark.parametrize("easy_margin", [False, True])
def test_arcface_gradients_finite_at_unit_cosine(easy_margin):
    cos = jnp.array([[1.0, -1.0], [-1.0, 1.0], [1.0000001, 0.0]])
    labels = jnp.array([0, 0, 0])

    def f(c, m):
        out = heads.margin_logits(
            c, labels, margin_type="arcface", margin=m, scale=10.0, easy_margin=easy_margin
        )
        return jnp.sum(out)

    g_cos, g_m = jax.jit(jax.grad(f, argnums=(0, 1)))(cos, np.full((3,), 0.3, np.float32))
    assert np.all(np.isfinite(g_cos)) and np.all(np.isfinite(g_m))


def test_unknown_margin_type_lists_valid_names():
    with pytest.raises(ValueError, match="none, cosface, arcface"):
        heads.margin_logits(np.zeros((1, 2)), np.array([0]), margin_type="sphere", scale=1.0)


# ---------------------------------------------------------------------------
# AdaCos scales.


def test_adacos_fixed_scale_values():
    assert heads.adacos_fixed_scale(81_313) == pytest.approx(15.99, abs=5e-3)
    assert heads.adacos_fixed_scale(203_094) == pytest.approx(17.28, abs=5e-3)
    with pytest.raises(ValueError, match="num_classes >= 3"):
        heads.adacos_fixed_scale(2)


@pytest.mark.parametrize("num_rows", [6, 7])  # even n: the tfp 'nearest' tie rule
def test_adacos_dynamic_scale_matches_numpy(num_rows):
    rng = np.random.default_rng(num_rows)
    num_classes, padded = 5, 8
    cos = rng.uniform(-0.5, 0.9, size=(num_rows + 2, padded)).astype(np.float32)
    cos[:, num_classes:] = 0.99  # even unmasked, padded columns must not count
    labels = rng.integers(0, num_classes, size=num_rows + 2)
    valid = np.arange(num_rows + 2) < num_rows  # two padded rows
    got = jax.jit(heads.adacos_dynamic_scale, static_argnums=2)(
        cos, labels, num_classes, valid_mask=valid
    )
    np.testing.assert_allclose(got, np_adacos_scale(cos, labels, num_classes, valid), rtol=1e-5)


def test_adacos_dynamic_scale_has_no_gradient():
    cos, labels = _cosines()

    def loss(c):
        s = heads.compute_scale("adacos_dynamic", num_classes=7, cosine=c, labels=labels)
        return s * jnp.sum(c)

    def loss_const(c):
        s = heads.adacos_dynamic_scale(jax.lax.stop_gradient(c), labels, 7)
        return s * jnp.sum(c)

    g, g_const = jax.jit(lambda c: (jax.grad(loss)(c), jax.grad(loss_const)(c)))(cos)
    np.testing.assert_allclose(g, g_const)
    assert np.all(np.isfinite(g))


def test_compute_scale_modes_and_errors():
    assert heads.compute_scale("fixed", num_classes=10, scale=45) == 45.0
    assert heads.compute_scale("adacos_fixed", num_classes=10) == pytest.approx(
        math.sqrt(2) * math.log(9)
    )
    with pytest.raises(ValueError, match="fixed, adacos_fixed, adacos_dynamic"):
        heads.compute_scale("adaptive", num_classes=10)
    with pytest.raises(ValueError, match="needs a scale"):
        heads.compute_scale("fixed", num_classes=10)
    with pytest.raises(ValueError, match="cosine and labels"):
        heads.compute_scale("adacos_dynamic", num_classes=10)


# ---------------------------------------------------------------------------
# Sharding.


def test_padded_num_classes():
    assert head_sharding.padded_num_classes(81_313, 8) == 81_344
    assert head_sharding.padded_num_classes(203_094, 8) == 203_136
    assert head_sharding.padded_num_classes(13, 8, per_shard_multiple=1) == 16
    assert head_sharding.padded_num_classes(16, 8, per_shard_multiple=1) == 16
    assert head_sharding.padded_num_classes(5, 1, per_shard_multiple=1) == 5
    with pytest.raises(ValueError, match=">= 1"):
        head_sharding.padded_num_classes(10, 0)


def test_param_shardings_paths():
    mesh = Mesh(np.array(jax.devices()), ("data",))
    params = {
        "model": {"neck": {"kernel": np.zeros((4, 8))}, "head": {"bias": np.zeros(3)}},
        "head": {"kernel": jax.ShapeDtypeStruct((4, 16), jnp.float32)},
    }
    specs = jax.tree.map(lambda s: s.spec, head_sharding.param_shardings(params, mesh, True))
    assert specs == {
        "model": {"neck": {"kernel": P()}, "head": {"bias": P()}},
        "head": {"kernel": P(None, "data")},
    }
    # The same rule reaches the head inside an optimizer state (its shapes).
    opt_state = jax.eval_shape(
        optax.sgd(0.1, momentum=0.9).init, {"head": {"kernel": np.zeros((4, 16), np.float32)}}
    )
    leaves = jax.tree.leaves(head_sharding.param_shardings(opt_state, mesh, True))
    assert [s.spec for s in leaves] == [P(None, "data")]
    unsharded = head_sharding.param_shardings(params, mesh, False)
    assert all(s.spec == P() for s in jax.tree.leaves(unsharded))
    with pytest.raises(ValueError, match="padded_num_classes"):
        head_sharding.param_shardings({"head": {"kernel": np.zeros((4, 12))}}, mesh, True)


def test_sharded_head_matches_single_device():
    """Class-sharded kernel + batch-sharded embeddings == one device, values and grads."""
    mesh = Mesh(np.array(jax.devices()), ("data",))
    num_classes, k, dim, batch = 13, 3, 8, 16
    padded = head_sharding.padded_num_classes(num_classes, 8, per_shard_multiple=1)  # 16
    clf = heads.CosineClassifier(num_classes, num_subcenters=k, num_classes_padded=padded)
    # On the host: placed below on one device and sharded, without resharding programs.
    head = jax.tree.map(np.asarray, _init(clf, 0, "rbg", np.zeros((1, dim), np.float32)))
    params = {"head": head, "model": {"scale": np.ones((dim,), np.float32)}}
    rng = np.random.default_rng(3)
    emb = rng.normal(size=(batch, dim)).astype(np.float32)
    labels = rng.integers(0, num_classes, size=batch).astype(np.int32)
    valid = np.arange(batch) < batch - 3
    counts = rng.integers(1, 50, size=num_classes)
    margins = jnp.asarray(losses.dynamic_margins(counts), jnp.float32)
    class_w = losses.class_weights(counts, "inv_log1p")
    class_w = jnp.asarray(class_w * losses.weight_normalizer(counts, None, class_w, 1.0))

    def make_grad_fn(clf):
        def loss_fn(params, emb, labels, valid):
            cos = clf.apply({"params": params["head"]}, emb * params["model"]["scale"])
            s = heads.adacos_dynamic_scale(cos, labels, num_classes, valid_mask=valid)
            logits = heads.margin_logits(
                cos, labels, margin_type="arcface", margin=margins[labels], scale=s
            )
            w = losses.sample_weights(labels, labels % 2 == 0, class_w, 0.5)
            return losses.weighted_cross_entropy(logits, labels, w, valid_mask=valid)[0]

        return jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1)))

    one = jax.devices()[0]
    ref_loss, (ref_gp, ref_gx) = make_grad_fn(clf)(
        *jax.device_put((params, emb, labels, valid), one)
    )

    batch_sharded = NamedSharding(mesh, P("data"))
    sharded_args = (
        jax.device_put(params, head_sharding.param_shardings(params, mesh, shard_head=True)),
        jax.device_put(emb, batch_sharded),
        jax.device_put(labels, batch_sharded),
        jax.device_put(valid, batch_sharded),
    )
    # Left to XLA's partitioner, and pinned with the classifier's mesh constraint.
    for sharded_clf in (clf, clf.clone(mesh=mesh)):
        loss, (gp, gx) = make_grad_fn(sharded_clf)(*sharded_args)
        np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
        np.testing.assert_allclose(gx, ref_gx, rtol=1e-4, atol=1e-6)
        for a, b in zip(jax.tree.leaves(gp), jax.tree.leaves(ref_gp), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
        kernel_grad = gp["head"]["kernel"]
        assert kernel_grad.sharding.spec == P(None, "data")
        shard_shapes = {s.data.shape for s in kernel_grad.addressable_shards}
        assert shard_shapes == {(dim, padded * k // 8)}
        # Padded classes get no gradient.
        np.testing.assert_array_equal(np.asarray(kernel_grad)[:, num_classes * k :], 0.0)
