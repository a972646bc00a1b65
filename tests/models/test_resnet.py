"""ResNet: shapes and parameter counts of 50/101 (abstractly), tiny runs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from landmark_jax.models.backbones import create_backbone

from backbone_variables import random_variables

# Published (and keras.applications count_params() with the top).
PARAMS_WITH_TOP = {"resnet50": 25_636_712, "resnet101": 44_707_176}
STRIDES = (2, 4, 8, 16, 32)


@pytest.mark.parametrize("name", sorted(PARAMS_WITH_TOP))
def test_shapes_and_parameter_count(name):
    module = create_backbone(name)
    features, variables = jax.eval_shape(
        lambda x: module.init_with_output(jax.random.key(0), x),
        jnp.zeros((2, 64, 96, 3), jnp.uint8),
    )
    channels = module.feature_channels()
    assert channels == {
        "stride_2": 64,
        "stride_4": 256,
        "stride_8": 512,
        "stride_16": 1024,
        "stride_32": 2048,
        "final": 2048,
    }
    for stride in STRIDES:
        assert features[f"stride_{stride}"].shape == (
            2,
            64 // stride,
            96 // stride,
            channels[f"stride_{stride}"],
        )
    assert features["final"].shape == features["stride_32"].shape
    count = sum(leaf.size for leaf in jax.tree_util.tree_leaves(variables))
    assert count + 2048 * 1000 + 1000 == PARAMS_WITH_TOP[name]
    blocks = [k for k in variables["params"] if k.startswith("conv4_block")]
    assert len(blocks) == {"resnet50": 6, "resnet101": 23}[name]


def test_tiny_forward_backward_and_stride_maps():
    module = create_backbone("resnet_tiny")
    x = np.random.default_rng(0).integers(0, 256, (2, 33, 47, 3), dtype=np.uint8)
    variables = random_variables(module, x.shape)

    @jax.jit
    def grads(params):
        def loss(p):
            out, _ = module.apply(
                {"params": p, "batch_stats": variables["batch_stats"]},
                x,
                train=True,
                mutable=["batch_stats"],
            )
            return jnp.mean(out["final"] ** 2), out

        return jax.grad(loss, has_aux=True)(params)

    g, out = grads(variables["params"])
    assert all(np.isfinite(leaf).all() for leaf in jax.tree_util.tree_leaves(g))
    assert np.abs(g["conv1_conv"]["kernel"]).sum() > 0
    # Odd sizes round up at every stride, as Keras's padding does.
    expected = {2: (17, 24), 4: (9, 12), 8: (5, 6), 16: (3, 3), 32: (2, 2)}
    for stride, hw in expected.items():
        assert out[f"stride_{stride}"].shape[1:3] == hw
    assert out["final"].shape[-1] == module.feature_channels()["final"] == 256


def test_stem_stride_one():
    module = create_backbone("resnet_tiny", stem_stride=1)
    features, _ = jax.eval_shape(
        lambda x: module.init_with_output(jax.random.key(0), x), jnp.zeros((1, 32, 32, 3))
    )
    assert features["stride_2"].shape[1:3] == (32, 32)
    assert features["stride_32"].shape[1:3] == (2, 2)
