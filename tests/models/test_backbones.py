"""Backbone registry, input-size check, normalisation presets, bf16, sharding."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from landmark_jax.models import backbones, input_normalization

from backbone_variables import random_variables

TINY = ("efficientnet_tiny", "resnet_tiny")
# The tiny runs' batch: the bf16 test's float32 forward is then the same
# program as the mesh test's single-device reference, compiled once.
BATCH = 8

# One compile per module value, input shape and placement: modules are
# static arguments, and equal ones (dataclasses compared by value) share it.
_apply = jax.jit(lambda module, variables, x: module.apply(variables, x), static_argnums=0)


@functools.cache
def _variables(name, shape):
    """random_variables of the float32 backbone `name`, drawn once for the
    tests that run it (its abstract init is traced once, not per test)."""
    return random_variables(backbones.create_backbone(name), shape)


def test_registry_names_and_unknown_name():
    expected = {f"efficientnet_b{i}" for i in range(8)} | {"resnet50", "resnet101"}
    assert expected <= set(backbones.BACKBONES)
    with pytest.raises(ValueError, match="unknown backbone 'effnet_b0'") as err:
        backbones.create_backbone("effnet_b0")
    for name in expected:
        assert name in str(err.value)
    with pytest.raises(ValueError, match="unknown backbone option"):
        backbones.create_backbone("resnet50", widht=3)
    assert backbones.BACKBONES["efficientnet_b7"].default_image_size == 600
    assert backbones.BACKBONES["efficientnet_b7"].head_dropout == 0.5


def test_check_image_size():
    backbones.check_image_size("efficientnet_b0", 32)
    backbones.check_image_size("resnet50", (512, np.int64(384)))
    with pytest.raises(ValueError, match=">= 32"):
        backbones.check_image_size("efficientnet_b0", (512, 16))
    with pytest.raises(ValueError, match="int"):
        backbones.check_image_size("resnet50", 224.0)
    with pytest.raises(ValueError, match="valid names"):
        backbones.check_image_size("vit", 224)


def test_normalization_presets():
    presets = input_normalization.INPUT_NORMALIZATIONS
    assert set(presets) == {"imagenet", "keras_efficientnet_imagenet", "caffe", "none"}
    np.testing.assert_allclose(
        presets["keras_efficientnet_imagenet"].scale, presets["imagenet"].scale, rtol=1e-12
    )
    np.testing.assert_allclose(
        presets["keras_efficientnet_imagenet"].offset, presets["imagenet"].offset, rtol=1e-12
    )
    x = np.array([[0.0, 255.0, 124.0]])
    red = x[0, 0] * presets["imagenet"].scale[0] + presets["imagenet"].offset[0]
    assert red == pytest.approx((0.0 - 0.485) / 0.229)
    assert input_normalization.match_input_normalization((1, 1, 1), (0, 0, 0)) == "none"
    assert input_normalization.match_input_normalization((2, 1, 1), (0, 0, 0)) is None
    with pytest.raises(ValueError, match="caffe"):
        input_normalization.get_input_normalization("tf")
    module = backbones.create_backbone("resnet_tiny")
    assert module.input_scale == presets["imagenet"].scale  # the default
    module = backbones.create_backbone("resnet_tiny", input_normalization="caffe")
    assert (module.input_scale, module.input_offset) == presets["caffe"]
    with pytest.raises(ValueError, match="unknown input normalization"):
        backbones.create_backbone("resnet_tiny", input_normalization="bgr")


@pytest.mark.parametrize("name", TINY)
def test_bf16_forward_close_to_float32(name):
    x = np.random.default_rng(0).integers(0, 256, (BATCH, 32, 32, 3), dtype=np.uint8)
    f32 = backbones.create_backbone(name)
    bf16 = backbones.create_backbone(name, dtype=jnp.bfloat16)
    variables = _variables(name, x.shape)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree_util.tree_leaves(variables))
    ref = _apply(f32, variables, x)
    out = _apply(bf16, variables, x)
    for key in ("stride_16", "final"):
        assert out[key].dtype == jnp.bfloat16
        scale = np.abs(np.asarray(ref[key])).max()
        err = np.abs(np.asarray(out[key], np.float32) - np.asarray(ref[key])).max()
        assert err <= 0.05 * scale, (key, err, scale)


@pytest.mark.parametrize("name", TINY)
def test_jit_on_8_device_mesh_with_sharded_batch(name):
    mesh = Mesh(np.array(jax.devices()), ("data",))
    module = backbones.create_backbone(name)
    x = np.random.default_rng(0).integers(0, 256, (BATCH, 32, 32, 3), dtype=np.uint8)
    variables = _variables(name, x.shape)
    batch = jax.device_put(x, NamedSharding(mesh, PartitionSpec("data")))
    replicated = jax.device_put(variables, NamedSharding(mesh, PartitionSpec()))
    out = _apply(module, replicated, batch)
    assert out["final"].shape[0] == 8
    assert len(out["final"].sharding.device_set) == 8
    expected = _apply(module, variables, x)["final"]
    np.testing.assert_allclose(out["final"], expected, rtol=1e-5, atol=1e-5)
