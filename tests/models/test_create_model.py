"""create_model and default_model_config: both models build and run; errors name the culprit."""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from landmark_jax.models import factory
from landmark_jax.models.dolg import DOLG
from landmark_jax.models.global_model import GlobalModel

from backbone_variables import random_variables

# Threefry keys: jitted, under the tests' XLA flags (helpers/cpu_devices.py),
# a threefry-based init compiles faster than an rbg-based one (efficientnet_tiny
# 3.1 s against 3.5 s, resnet_tiny 1.2 s against 1.4 s on 2 cores); rbg keys
# only win where an init runs op by op.
KEY = jax.random.key(0)
TOP_KEYS = {
    "name",
    "backbone",
    "embedding_dim",
    "pooling",
    "neck",
    "dropout",
    "descriptor",
    "dtype",
    "dolg",
    "input_normalization",
    "padding",
    "drop_connect_rate",
    "batch_norm",
    "conv_lowering",
    "remat",
}
DOLG_KEYS = {
    "dilations",
    "branch_channels",
    "local_dim",
    "global_dim",
    "image_pooling",
    "global_branch",
}


# The global model of the training-step tests below, on each tiny backbone.
GLOBAL = {"name": "global", "embedding_dim": 8, "pooling": "gem", "neck": "dense_bn_prelu"}


@functools.cache
def _global_variables(backbone):
    """GLOBAL's variables on `backbone`, from its compiled init, once per
    backbone: compiling an init takes seconds, and remat, conv lowering,
    drop-connect rate and dropout, which the tests vary, leave a model's
    variables as they are. (A compiled init depends on the variables alone:
    jit drops the unused forward and input, so on resnet_tiny this is the
    program test_create_model_builds_and_runs compiled, which the persistent
    compilation cache holds.)"""
    model = factory.create_model({**GLOBAL, "backbone": backbone})
    return jax.jit(model.init)(KEY, np.zeros((1, 32, 32, 3), np.float32))


def _small(name, **overrides):
    config = factory.default_model_config(name)
    config.backbone = "resnet_tiny"
    config.embedding_dim = 8
    config.dolg.update(branch_channels=4, local_dim=8, global_dim=8)
    config.update(overrides)
    return config


@pytest.mark.parametrize("name", ["global", "dolg"])
def test_default_config_has_every_key(name):
    config = factory.default_model_config(name)
    assert isinstance(config, ml_collections.ConfigDict)
    assert set(config) == TOP_KEYS and set(config.dolg) == DOLG_KEYS
    assert config.name == name and config.embedding_dim == 512
    # The recipes: GLR2020 GAP + Dense/swish, GLR2021 GeM + Dense/BN/PReLU.
    expected = {"global": ("gap", "dense_swish"), "dolg": ("gem", "dense_bn_prelu")}[name]
    assert (config.pooling, config.neck) == expected
    assert config.descriptor == "embedding"  # both recipes search with the neck's output
    assert config.conv_lowering == "auto"  # decided when the model is traced, per backend
    assert config.remat == "none"  # off where memory is not the limit
    # Unset backbone options resolve to what they stand for, so a resolved
    # config rebuilds the same model.
    resolved = {
        **config.to_dict(),
        "input_normalization": "imagenet",
        "padding": "same",
        "drop_connect_rate": 0.2,
    }
    assert factory.resolve_model_config({"name": name}) == resolved
    assert factory.resolve_model_config(resolved) == resolved


@pytest.mark.parametrize(
    "name, cls, overrides",
    [
        ("global", GlobalModel, dict(pooling="gem", neck="dense_bn_prelu", dropout=0.1)),
        ("dolg", DOLG, dict(dtype="bfloat16")),
    ],
)
def test_create_model_builds_and_runs(name, cls, overrides):
    model = factory.create_model(_small(name, **overrides).to_dict())  # a plain dict works too
    assert isinstance(model, cls)
    x = jnp.asarray(np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 3)), jnp.float32)
    variables = jax.jit(model.init)(KEY, x)
    assert variables["params"]["backbone"]  # backbone weights load under params['backbone']
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(variables))
    out = jax.jit(model.apply)(variables, x)
    assert out.shape == (2, 8) and out.dtype == jnp.float32 and np.all(np.isfinite(out))
    if name == "dolg":
        assert model.dtype == jnp.bfloat16 and model.backbone.dtype == jnp.bfloat16
        assert variables["params"]["global_pool"]["p"] == 3.0
        assert variables["params"]["neck"]["prelu"]["negative_slope"] == 0.25
    else:
        assert model.dropout == 0.1
        out_train, _ = jax.jit(
            lambda v, x, r: model.apply(
                v, x, train=True, mutable=["batch_stats"], rngs={"dropout": r}
            )
        )(variables, x, KEY)
        assert out_train.shape == (2, 8)


def test_unknown_model_name_lists_valid():
    with pytest.raises(ValueError, match=r"'delg'.*\['dolg', 'global'\]"):
        factory.create_model({"name": "delg"})
    with pytest.raises(ValueError, match=r"\['dolg', 'global'\]"):
        factory.default_model_config("resnet")
    with pytest.raises(ValueError, match=r"None.*\['dolg', 'global'\]"):
        factory.create_model({"backbone": "resnet50"})


@pytest.mark.parametrize(
    "config, match",
    [
        ({"name": "global", "embeding_dim": 8}, r"unknown key 'embeding_dim'.*embedding_dim"),
        ({"name": "dolg", "dolg": {"dilation": (1, 2, 3)}}, r"unknown key 'dolg\.dilation'"),
        ({"name": "dolg", "dolg": 3}, r"'dolg' must be a mapping"),
        ({"name": "global", "pooling": "max"}, r"'max'.*\['gap', 'gem'\]"),
        ({"name": "global", "neck": "mlp"}, r"'mlp'.*dense_swish"),
        ({"name": "dolg", "dtype": "float16"}, r"'float16'.*\['bfloat16', 'float32'\]"),
        ({"name": "dolg", "dolg": {"global_branch": "x"}}, r"'x'.*gem_fc"),
        ({"name": "dolg", "backbone": "resnet18"}, r"'resnet18'.*resnet50"),
        ({"name": "global", "input_normalization": "bgr"}, r"'bgr'.*caffe.*imagenet"),
        ({"name": "global", "backbone": "resnet50", "padding": "same"}, r"resnet50 has no padding"),
        ({"name": "global", "padding": "valid"}, r"'valid'.*keras_dynamic"),
        ({"name": "global", "backbone": "resnet50", "drop_connect_rate": 0.1}, r"no stochastic"),
        ({"name": "global", "drop_connect_rate": 1.0}, r"drop_connect_rate=1.0"),
        ({"name": "global", "batch_norm": "sync"}, r"'sync'.*frozen"),
        ({"name": "global", "descriptor": "neck"}, r"model.descriptor 'neck'.*'pooled'"),
    ],
)
def test_config_errors_name_the_problem(config, match):
    with pytest.raises(ValueError, match=match):
        factory.create_model(ml_collections.ConfigDict(config))


def test_backbone_options_reach_the_backbone():
    model = factory.create_model(
        {
            "name": "dolg",
            "backbone": "efficientnet_b0",
            "input_normalization": "caffe",
            "padding": "keras_dynamic",
            "drop_connect_rate": 0.0,
            "batch_norm": "frozen",
        }
    )
    b = model.backbone
    assert (b.input_scale, b.padding, b.drop_connect_rate, b.batch_norm) == (
        (1.0, 1.0, 1.0),
        "keras_dynamic",
        0.0,
        "frozen",
    )
    assert b.input_offset == pytest.approx((-123.68, -116.779, -103.939))
    assert model.batch_norm == "frozen"
    resnet = factory.create_model({"name": "global", "backbone": "resnet50"})
    assert resnet.backbone.input_scale == pytest.approx(
        (1 / 255 / 0.229, 1 / 255 / 0.224, 1 / 255 / 0.225)
    )


def test_frozen_batch_norm_trains_on_moving_statistics(name="dolg"):
    """'frozen': in training every BatchNorm normalises with its moving
    statistics and leaves them unchanged, while gamma/beta get gradients;
    the output then equals inference mode. 'batch' differs on both counts."""
    x = jnp.asarray(np.random.default_rng(1).uniform(0, 255, (4, 32, 32, 3)), jnp.float32)
    frozen = factory.create_model(_small(name, neck="dense_bn_prelu", batch_norm="frozen"))
    batch = frozen.clone(batch_norm="batch", backbone=frozen.backbone.clone(batch_norm="batch"))
    variables = random_variables(frozen, x.shape)
    # Moving statistics far from this batch's, so the two modes differ.
    rng = np.random.default_rng(3)
    stats = jax.tree_util.tree_map_with_path(
        lambda path, v: np.asarray(
            rng.uniform(0.5, 2.0, v.shape)
            if jax.tree_util.keystr(path).endswith("'var']")
            else rng.normal(0.0, 0.2, v.shape),
            v.dtype,
        ),
        variables["batch_stats"],
    )
    variables = {**variables, "batch_stats": stats}

    def train(model, v):
        return model.apply(v, x, train=True, mutable=["batch_stats"])

    @jax.jit
    def frozen_step(v):
        """Training mode's output, statistics and gradients, and inference
        mode's output: one program (the gradient's forward is the output's)."""

        def loss(p):
            out, updates = train(frozen, {**v, "params": p})
            return jnp.sum(out**2), (out, updates)

        (_, (out, updates)), grads = jax.value_and_grad(loss, has_aux=True)(v["params"])
        return out, updates, grads, frozen.apply(v, x)

    out, updates, grads, out_inference = frozen_step(variables)
    np.testing.assert_allclose(out, out_inference, rtol=1e-5, atol=1e-5)
    for a, b in zip(jax.tree.leaves(updates["batch_stats"]), jax.tree.leaves(stats), strict=True):
        np.testing.assert_array_equal(a, b)
    bn_grads = [
        g
        for path, g in jax.tree_util.tree_leaves_with_path(grads)
        if "bn" in jax.tree_util.keystr(path)
    ]
    # gamma/beta still learn (a few may get no gradient behind a dead ReLU).
    assert len(bn_grads) > 4 and np.mean([np.abs(g).max() > 0 for g in bn_grads]) > 0.5

    out_batch, updates_batch = jax.jit(lambda v: train(batch, v))(variables)
    assert np.abs(np.asarray(out_batch) - np.asarray(out)).max() > 1e-3
    changed = [
        not np.array_equal(a, b)
        for a, b in zip(
            jax.tree.leaves(updates_batch["batch_stats"]), jax.tree.leaves(stats), strict=True
        )
    ]
    assert all(changed)


def test_drop_connect_rate_zero_makes_training_deterministic():
    # 16 examples: each keeps or drops the residual branches independently.
    x = jnp.asarray(np.random.default_rng(2).uniform(0, 255, (16, 32, 32, 3)), jnp.float32)
    config = {**GLOBAL, "backbone": "efficientnet_tiny"}
    on = factory.create_model({**config, "drop_connect_rate": 0.9})
    off = factory.create_model({**config, "drop_connect_rate": 0.0})
    variables = _global_variables("efficientnet_tiny")

    # Jitted: one compile per model instead of hundreds of eager ops; the
    # module static, the key an argument, so both seeds share the compile.
    @functools.partial(jax.jit, static_argnums=0)
    def forward(model, seed):
        out, _ = model.apply(
            variables,
            x,
            train=True,
            mutable=["batch_stats"],
            rngs={"dropout": jax.random.key(seed)},
        )
        return out

    def run(model, seed):
        return np.asarray(forward(model, seed))

    assert np.abs(run(on, 0) - run(on, 1)).max() > 1e-4
    np.testing.assert_array_equal(run(off, 0), run(off, 1))


@pytest.mark.parametrize("backbone", ["efficientnet_tiny", "resnet_tiny"])
def test_remat_blocks_gives_the_same_training_step_with_blocks_recomputed(backbone):
    """model.remat='blocks': the same variables, embedding, batch statistics and
    gradients in training mode (drop-connect included: its masks come from
    the same keys), and each backbone block is a jax.checkpoint (remat) in
    the traced step, which is what lets XLA free its insides."""
    from landmark_jax.models import layers

    config = {**GLOBAL, "backbone": backbone, "conv_lowering": "xla"}
    plain = factory.create_model({**config, "remat": "none"})
    remat = factory.create_model({**config, "remat": "blocks"})
    images = np.random.default_rng(4).uniform(0, 255, (4, 32, 32, 3)).astype(np.float32)
    variables = _global_variables(backbone)
    shapes = jax.eval_shape(remat.init, jax.random.PRNGKey(0), images)
    assert jax.tree.map(jnp.shape, shapes) == jax.tree.map(jnp.shape, variables)

    def loss(params, model):
        out, updates = model.apply(
            {**variables, "params": params},
            images,
            train=True,
            mutable=["batch_stats"],
            rngs={"dropout": jax.random.PRNGKey(1)},
        )
        return jnp.sum(out**2), (out, updates)

    step = jax.value_and_grad(loss, has_aux=True)
    (_, (want, stats_want)), grads_want = jax.jit(step, static_argnums=1)(
        variables["params"], plain
    )
    (_, (got, stats_got)), grads_got = jax.jit(step, static_argnums=1)(variables["params"], remat)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    for a, b in zip(jax.tree.leaves(stats_got), jax.tree.leaves(stats_want), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    for g, h in zip(jax.tree.leaves(grads_got), jax.tree.leaves(grads_want), strict=True):
        np.testing.assert_allclose(g, h, rtol=1e-4, atol=1e-5 * float(np.abs(np.asarray(h)).max()))
    blocks = len(variables["params"]["backbone"]) - sum(
        not name.startswith(("block", "conv2", "conv3", "conv4", "conv5"))
        for name in variables["params"]["backbone"]
    )

    def rematerialised(model):
        forward = jax.make_jaxpr(lambda p: loss(p, model))(variables["params"])
        return sum("remat" in e.primitive.name for e in forward.jaxpr.eqns)

    assert rematerialised(remat) == blocks > 0
    assert rematerialised(plain) == 0
    with pytest.raises(ValueError, match=r"model.remat='all'; valid: \('none', 'blocks'\)"):
        factory.create_model({**config, "remat": "all"})
    assert layers.REMAT_MODES == ("none", "blocks")
