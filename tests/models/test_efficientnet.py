"""EfficientNet: shapes and parameter counts of B0-B7 (abstractly), tiny runs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from landmark_jax.models import efficientnet
from landmark_jax.models.backbones import create_backbone

from backbone_variables import random_variables

# keras.applications.EfficientNetB*(include_top=True, weights=None)
# .count_params() (keras 3.15); the Keras docs round them to 5.3M ... 66.7M.
# They include the 1000-class top and the 7 weights of Keras's Normalization
# layer (mean, variance, count), which the Flax module folds into constants.
KERAS_COUNT_PARAMS_WITH_TOP = {
    "b0": 5_330_571,
    "b1": 7_856_239,
    "b2": 9_177_569,
    "b3": 12_320_535,
    "b4": 19_466_823,
    "b5": 30_562_527,
    "b6": 43_265_143,
    "b7": 66_658_687,
}
PUBLISHED_MILLIONS = {
    "b0": 5.3,
    "b1": 7.9,
    "b2": 9.2,
    "b3": 12.3,
    "b4": 19.5,
    "b5": 30.6,
    "b6": 43.3,
    "b7": 66.7,
}
STRIDES = (2, 4, 8, 16, 32)


def _abstract_init(module, shape):
    """Variables and outputs as shapes only: no compute, even for B7."""
    return jax.eval_shape(
        lambda x: module.init_with_output(jax.random.key(0), x),
        jax.ShapeDtypeStruct(shape, jnp.uint8),
    )


@pytest.mark.parametrize("variant", sorted(efficientnet.EFFICIENTNET_VARIANTS))
def test_variant_shapes_and_parameter_count(variant):
    module = create_backbone(f"efficientnet_{variant}")
    features, variables = _abstract_init(module, (2, 64, 96, 3))
    channels = module.feature_channels()
    assert set(features) == {f"stride_{s}" for s in STRIDES} | {"final"} == set(channels)
    for stride in STRIDES:
        assert features[f"stride_{stride}"].shape == (
            2,
            64 // stride,
            96 // stride,
            channels[f"stride_{stride}"],
        )
    assert features["final"].shape == (2, 2, 3, channels["final"])
    assert all(f.dtype == jnp.float32 for f in features.values())

    count = sum(leaf.size for leaf in jax.tree_util.tree_leaves(variables))
    top = channels["final"] * 1000 + 1000  # the ImageNet classifier
    assert count + top + 7 == KERAS_COUNT_PARAMS_WITH_TOP[variant]
    assert round((count + top) / 1e6, 1) == PUBLISHED_MILLIONS[variant]
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree_util.tree_leaves(variables))


def test_block_table_matches_published_b0_and_b7():
    b0 = create_backbone("efficientnet_b0")
    specs = b0.block_specs()
    assert len(specs) == 16 and specs[0].name == "block1a" and specs[-1].name == "block7a"
    assert [s.drop_rate for s in specs[:2]] == [0.0, 0.2 / 16]
    b7 = create_backbone("efficientnet_b7")
    assert len(b7.block_specs()) == 55
    assert b7.feature_channels()["final"] == 2560
    assert efficientnet.round_filters(32, 2.0) == 64
    assert efficientnet.round_repeats(4, 3.1) == 13


def test_tiny_forward_backward_with_drop_connect():
    module = create_backbone("efficientnet_tiny", drop_connect_rate=0.5)
    x = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    variables = random_variables(module, x.shape)

    @jax.jit
    def loss_and_grads(params, batch_stats, key):
        def loss(p):
            out, updates = module.apply(
                {"params": p, "batch_stats": batch_stats},
                x,
                train=True,
                rngs={"dropout": key},
                mutable=["batch_stats"],
            )
            return jnp.mean(out["final"] ** 2), updates

        return jax.value_and_grad(loss, has_aux=True)(params)

    (value, updates), grads = loss_and_grads(
        variables["params"], variables["batch_stats"], jax.random.key(1)
    )
    assert np.isfinite(value)
    assert all(np.isfinite(g).all() for g in jax.tree_util.tree_leaves(grads))
    assert np.abs(grads["stem_conv"]["kernel"]).sum() > 0
    old, new = (
        variables["batch_stats"]["stem_bn"]["mean"],
        updates["batch_stats"]["stem_bn"]["mean"],
    )
    assert not np.allclose(old, new)
    # Drop-connect is random in training and off in inference.
    (value2, _), _ = loss_and_grads(
        variables["params"], variables["batch_stats"], jax.random.key(2)
    )
    assert float(value) != float(value2)
    inference = jax.jit(module.apply)
    np.testing.assert_array_equal(
        inference(variables, x)["final"], inference(variables, x)["final"]
    )


@pytest.mark.parametrize(
    "padding,size,expected",
    [
        ("same", (33, 47), {2: (17, 24), 32: (2, 2)}),  # ceil(size / stride)
        ("keras_dynamic", (33, 47), {2: (16, 23), 32: (1, 1)}),
    ],
)
def test_padding_modes_on_odd_sizes(padding, size, expected):
    module = create_backbone("efficientnet_tiny", padding=padding)
    features, _ = _abstract_init(module, (1, *size, 3))
    for stride, hw in expected.items():
        assert features[f"stride_{stride}"].shape[1:3] == hw


def test_padding_modes_agree_on_multiples_of_32():
    x = np.random.default_rng(1).uniform(0, 255, (1, 64, 32, 3)).astype(np.float32)
    same = create_backbone("efficientnet_tiny")
    dynamic = create_backbone("efficientnet_tiny", padding="keras_dynamic")
    variables = random_variables(same, x.shape)
    np.testing.assert_allclose(
        jax.jit(same.apply)(variables, x)["final"],
        jax.jit(dynamic.apply)(variables, x)["final"],
        rtol=1e-5,
        atol=1e-5,
    )
    with pytest.raises(ValueError, match="padding"):
        jax.eval_shape(create_backbone("efficientnet_tiny", padding="valid").apply, variables, x)


def test_stem_stride_one_doubles_resolution():
    module = create_backbone("efficientnet_tiny", stem_stride=1)
    features, _ = _abstract_init(module, (1, 32, 32, 3))
    assert features["stride_2"].shape[1:3] == (32, 32)  # nominal key, stride 1
    assert features["stride_32"].shape[1:3] == (2, 2)
