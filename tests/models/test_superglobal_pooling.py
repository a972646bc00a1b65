"""SuperGlobal's pooling (models/superglobal_pooling.py) against numpy written from the
released code (helpers/superglobal_reference.py; ReLU+'s placement from model/resnet.py),
and at the models' pooling sites."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import superglobal_reference as ref

from landmark_jax.models import factory, resnet
from landmark_jax.models import superglobal_pooling as sg

from backbone_variables import random_variables

RNG = np.random.default_rng(0)
# Post-ReLU maps (what the code pools: its ResNet's res5 output), with exact zeros.
MAP = np.maximum(RNG.normal(0.3, 1.0, (2, 5, 6, 7)), 0.0).astype(np.float32)


def test_gem_plus_is_the_codes_gemp():
    np.testing.assert_allclose(sg.gem_plus(MAP), ref.gemp(MAP), rtol=1e-5)
    np.testing.assert_allclose(
        sg.gem_plus(MAP - 0.5, p=3.0, eps=1e-6), ref.gemp(MAP - 0.5, 3.0, 1e-6), rtol=1e-5
    )
    assert (sg.GEM_PLUS_P, sg.GEM_PLUS_EPS) == (4.6, 1e-8)


def test_regional_gem_is_the_codes_rgem():
    out = sg.regional_gem(MAP)
    assert out.shape == MAP.shape and out.dtype == jnp.float32
    np.testing.assert_allclose(out, ref.rgem(MAP), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        sg.regional_gem(MAP, p=3.0, size=3), ref.rgem(MAP, 3.0, 3), rtol=1e-5, atol=1e-6
    )
    # A swish map's negative values: 0 in the windows, kept by the residual half.
    signed = MAP - 0.2
    np.testing.assert_allclose(sg.regional_gem(signed), ref.rgem(signed), rtol=1e-5, atol=1e-6)
    # Maps no wider than the padding (the code's ReflectionPad2d refuses them):
    # repeated reflection, as numpy's.
    tiny = MAP[:, :2, :1]
    np.testing.assert_allclose(sg.regional_gem(tiny), ref.rgem(tiny), rtol=1e-5, atol=1e-6)
    # Lowers for images of any size (the SavedModel's symbolic sides).
    h, w = jax.export.symbolic_shape("h, w")
    exported = jax.export.export(jax.jit(sg.regional_gem))(
        jax.ShapeDtypeStruct((2, h, w, 7), jnp.float32)
    )
    assert exported.out_avals[0].shape == (2, h, w, 7)
    assert (sg.REGIONAL_GEM_P, sg.REGIONAL_GEM_SIZE) == (2.5, 5)
    with pytest.raises(ValueError, match="size=4: expected an odd"):
        sg.regional_gem(MAP, size=4)


def test_scale_gem_is_the_codes_sgem():
    stacked = RNG.normal(0.0, 1.0, (3, 4, 6)).astype(np.float32)  # 3 scales, 4 images
    for xp in (jnp, np):
        np.testing.assert_allclose(sg.scale_gem(stacked, xp=xp), ref.sgem(stacked), rtol=1e-5)
        np.testing.assert_allclose(
            sg.scale_gem(stacked, p=10.0, xp=xp),
            ref.sgem(stacked, infinity=False),
            rtol=1e-5,
        )
    assert np.isinf(sg.SCALE_GEM_P)


def test_relu_plus_is_the_codes_relup():
    x = jnp.asarray([-1.0, 0.0, 0.01, 0.014, 0.5], jnp.bfloat16)
    out = sg.relu_plus(x)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_array_equal(out, np.maximum(np.asarray(x), np.asarray(0.014, jnp.bfloat16)))
    np.testing.assert_array_equal(sg.relu_plus(jnp.asarray(MAP), 0.3), np.maximum(MAP, 0.3))
    assert sg.RELU_PLUS_ALPHA == 0.014


def _activations(model, alpha):
    """{block name: (inner floor, output floor)}: what each bottleneck's two
    activations make of -1, read off the modules ResNet builds (traced only)."""
    acts = {}

    def record(next_fun, args, kwargs, context):
        block = context.module
        if isinstance(block, resnet.BottleneckBlock) and context.method_name == "__call__":
            acts[block.name] = (block.act, block.out_act or block.act)
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):  # init runs the forward pass: traced, not compiled
        jax.eval_shape(
            model.clone(relu_plus=alpha).init, jax.random.key(0), jnp.zeros((1, 64, 64, 3))
        )
    probe = jnp.asarray(-1.0)
    return {name: (float(inner(probe)), float(out(probe))) for name, (inner, out) in acts.items()}


def test_relu_plus_replaces_the_resnet_activations_the_code_does():
    """model/resnet.py: relup(0.014) after every block of the stages with w_out !=
    2048 (conv2-conv4) and inside the w_out == 256 stage's bottlenecks (conv2);
    conv5's and every other ReLU stay."""
    model = resnet.ResNet(stage_sizes=resnet.RESNET_STAGE_SIZES["resnet50"])
    floors = _activations(model, 0.014)
    assert len(floors) == 16
    for name, (inner, out) in floors.items():
        stage = int(name[4])  # convS_blockJ
        assert inner == (np.float32(0.014) if stage == 2 else 0.0), name
        assert out == (np.float32(0.014) if stage < 5 else 0.0), name
    assert set(_activations(model, None).values()) == {(0.0, 0.0)}


def _map_and_pooled(model, variables, x, override):
    """(the pooled map, what the pooling site gave) with `override` at that site."""
    _, state = model.clone(pool_override=override).apply(
        variables,
        x,
        mutable=["intermediates"],
        capture_intermediates=lambda m, _: m.name == "backbone",
    )
    return state["intermediates"]


@pytest.mark.parametrize("name", ["global", "dolg"])
def test_pooling_override_at_the_models_pooling_site(name):
    """GeM+ after Regional-GeM on the map each model pools (GlobalModel's final map,
    DOLG's stride-32 map in its global branch), against the numpy references; the
    trained pooling's GeM p is ignored, as the code ignores its head's."""
    config = factory.default_model_config(name)
    config.update(backbone="resnet_tiny", embedding_dim=8, pooling="gem")
    config.dolg.update(dilations=(), branch_channels=4, local_dim=8, global_dim=8)
    model = factory.create_model(config)
    x = jnp.asarray(RNG.uniform(0, 255, (2, 64, 64, 3)), jnp.float32)
    variables = random_variables(model, x.shape)
    override = sg.PoolingOverride(gem_plus_p=4.6, regional_gem_p=2.5, regional_gem_size=3)
    state = jax.jit(lambda v, x: _map_and_pooled(model, v, x, override))(variables, x)
    features = state["backbone"]["__call__"][0]
    if name == "global":
        expected = ref.gemp(ref.rgem(features["final"], 2.5, 3))
        np.testing.assert_allclose(state["pooled"][0], expected, rtol=1e-5)
    else:
        pooled = ref.gemp(ref.rgem(features["stride_32"], 2.5, 3))
        fc = variables["params"]["global_fc"]
        expected = pooled @ np.asarray(fc["kernel"], np.float64) + fc["bias"]
        np.testing.assert_allclose(state["global"][0], expected, rtol=1e-4, atol=1e-5)
