"""create_model and default_model_config: both models build and run; errors name the culprit."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from landmark_jax import models
from landmark_jax.models.dolg import DOLG
from landmark_jax.models.global_model import GlobalModel

# rbg keys: XLA compiles threefry-based parameter init ~6x slower on CPU.
KEY = jax.random.key(0, impl="rbg")
TOP_KEYS = {"name", "backbone", "embedding_dim", "pooling", "neck", "dropout", "dtype", "dolg"}
DOLG_KEYS = {
    "dilations",
    "branch_channels",
    "local_dim",
    "global_dim",
    "image_pooling",
    "global_branch",
}


def _small(name, **overrides):
    config = models.default_model_config(name)
    config.backbone = "resnet_tiny"
    config.embedding_dim = 8
    config.dolg.update(branch_channels=4, local_dim=8, global_dim=8)
    config.update(overrides)
    return config


@pytest.mark.parametrize("name", ["global", "dolg"])
def test_default_config_has_every_key(name):
    config = models.default_model_config(name)
    assert isinstance(config, ml_collections.ConfigDict)
    assert set(config) == TOP_KEYS and set(config.dolg) == DOLG_KEYS
    assert config.name == name and config.embedding_dim == 512
    # The recipes: GLR2020 GAP + Dense/swish, GLR2021 GeM + Dense/BN/PReLU.
    expected = {"global": ("gap", "dense_swish"), "dolg": ("gem", "dense_bn_prelu")}[name]
    assert (config.pooling, config.neck) == expected
    assert models.resolve_model_config({"name": name}) == config.to_dict()


@pytest.mark.parametrize(
    "name, cls, overrides",
    [
        ("global", GlobalModel, dict(pooling="gem", neck="dense_bn_prelu", dropout=0.1)),
        ("dolg", DOLG, dict(dtype="bfloat16")),
    ],
)
def test_create_model_builds_and_runs(name, cls, overrides):
    model = models.create_model(_small(name, **overrides).to_dict())  # a plain dict works too
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
        models.create_model({"name": "delg"})
    with pytest.raises(ValueError, match=r"\['dolg', 'global'\]"):
        models.default_model_config("resnet")
    with pytest.raises(ValueError, match=r"None.*\['dolg', 'global'\]"):
        models.create_model({"backbone": "resnet50"})


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
    ],
)
def test_config_errors_name_the_problem(config, match):
    with pytest.raises(ValueError, match=match):
        models.create_model(ml_collections.ConfigDict(config))
