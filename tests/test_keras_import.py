"""Keras import: parity with keras.applications on randomised weights, the CLI.

Keras models are built with weights=None and then every non-kernel weight is
randomised (kernels already are): biases, BatchNorm gamma/beta and moving
mean AND variance (different positive values, so a mean/variance swap cannot
pass) and the Normalization layer's mean/variance. Nothing is downloaded.
"""

import json

import jax
import keras
import numpy as np
import pytest

from landmark_jax.models import backbone_checkpoint, input_normalization, keras_import

RNG = np.random.default_rng(0)
# Relative to the output's scale, per the issue.
PARITY_RTOL = 1e-4


def _randomize(model):
    for layer in model.layers:
        for w in layer.weights:
            shape = tuple(w.shape)
            values = {
                "gamma": lambda s: RNG.uniform(0.5, 1.5, s),
                "beta": lambda s: RNG.normal(0.0, 0.2, s),
                "bias": lambda s: RNG.normal(0.0, 0.2, s),
                "moving_mean": lambda s: RNG.normal(0.0, 0.5, s),
                "moving_variance": lambda s: RNG.uniform(0.5, 2.0, s),
                "mean": lambda s: RNG.uniform(0.3, 0.6, s),
                "variance": lambda s: RNG.uniform(0.03, 0.1, s),
            }
            if w.name in values:
                w.assign(values[w.name](shape).astype(np.float32))
        if type(layer).__name__ == "Normalization":
            layer.finalize_state()  # make call() use the new mean/variance
    return model


@pytest.fixture(scope="module")
def keras_b0():
    return _randomize(keras.applications.EfficientNetB0(include_top=False, weights=None))


@pytest.fixture(scope="module")
def keras_r50():
    return _randomize(keras.applications.ResNet50(include_top=False, weights=None))


def _pixels(*shape):
    return RNG.uniform(0, 255, (2, *shape, 3)).astype(np.float32)


def _assert_parity(expected, got):
    expected, got = np.asarray(expected), np.asarray(got)
    assert expected.shape == got.shape
    scale = np.abs(expected).max()
    assert np.abs(expected - got).max() <= PARITY_RTOL * scale


@pytest.mark.parametrize("fixture", ["keras_b0", "keras_r50"])
def test_parity_at_two_sizes_and_swap_sensitivity(fixture, request):
    keras_model = request.getfixturevalue(fixture)
    module, variables = keras_import.from_keras(keras_model)
    apply = jax.jit(module.apply)
    for shape in [(64, 64), (96, 80)]:
        x = _pixels(*shape)
        _assert_parity(keras_model(x), apply(variables, x)["final"])
    # The test can fail: swapping one BN's moving mean and variance breaks it.
    bn = "stem_bn" if fixture == "keras_b0" else "conv1_bn"
    stats = variables["batch_stats"][bn]
    swapped = {"mean": stats["var"], "var": stats["mean"] ** 2 + 0.5}  # keep var > 0
    bad = apply({**variables, "batch_stats": {**variables["batch_stats"], bn: swapped}}, x)
    assert np.isfinite(bad["final"]).all()
    error = np.abs(np.asarray(keras_model(x)) - bad["final"]).max()
    assert error > 10 * PARITY_RTOL * np.abs(bad["final"]).max()


def test_efficientnet_mapping_and_counts(keras_b0, keras_r50):
    module, variables = keras_import.from_keras(keras_b0)
    # Dynamic input shape: Keras pads every stride-2 conv by (k//2 - 1, k//2).
    assert module.padding == "keras_dynamic"
    normalization = keras_b0.get_layer(
        [n.name for n in keras_b0.layers if n.name.startswith("normalization")][0]
    )
    mean = np.asarray(normalization.mean).ravel()
    std = np.sqrt(np.asarray(normalization.variance).ravel())
    np.testing.assert_allclose(module.input_scale, 1 / (255 * std), rtol=1e-6)
    np.testing.assert_allclose(module.input_offset, -mean / std, rtol=1e-6)
    count = sum(v.size for v in jax.tree_util.tree_leaves(variables))
    assert count + 7 == keras_b0.count_params()  # 7: Normalization's mean, var, count
    depthwise = keras_b0.get_layer("block2a_dwconv").get_weights()[0]
    np.testing.assert_array_equal(
        variables["params"]["block2a"]["dwconv"]["kernel"][:, :, 0], depthwise[..., 0]
    )
    np.testing.assert_array_equal(
        variables["batch_stats"]["top_bn"]["var"],
        np.asarray(keras_b0.get_layer("top_bn").moving_variance),
    )
    module, variables = keras_import.from_keras(keras_r50)
    assert module.input_scale == (1.0, 1.0, 1.0) and module.input_offset == (0.0, 0.0, 0.0)
    assert sum(v.size for v in jax.tree_util.tree_leaves(variables)) == keras_r50.count_params()


def test_static_input_shape_uses_same_padding(keras_b0):
    # Built for 80x72, Keras pads from the real (odd at stride 16) sizes,
    # which is TensorFlow SAME padding.
    static = keras.applications.EfficientNetB0(
        include_top=False, weights=None, input_shape=(80, 72, 3)
    )
    static.set_weights(keras_b0.get_weights())
    module, variables = keras_import.from_keras(static)
    assert module.padding == "same"
    x = _pixels(80, 72)
    out = jax.jit(module.apply)(variables, x)["final"]
    assert out.shape == (2, 3, 3, 1280)
    _assert_parity(static(x), out)


def test_unknown_architecture_and_head_are_rejected():
    inputs = keras.Input((None, None, 3))
    hidden = keras.layers.Conv2D(4, 3, name="conv")(inputs)
    other = keras.Model(inputs, hidden, name="not_a_backbone")
    with pytest.raises(ValueError, match="neither a keras.applications EfficientNet nor a ResNet"):
        keras_import.from_keras(other)
    pooled = keras.layers.GlobalAveragePooling2D()(hidden)
    head = keras.Model(inputs, keras.layers.Dense(3, name="predictions")(pooled))
    with pytest.raises(ValueError, match="include_top=False"):
        keras_import.from_keras(head)


def test_missing_and_unexpected_weights_are_listed(keras_b0):
    module, _ = keras_import.from_keras(keras_b0)
    weights = keras_import._keras_weights(keras_b0)
    del weights["block3b_project_bn/moving_variance"]
    weights["extra_conv/kernel"] = np.zeros((1, 1, 3, 3), np.float32)
    consumed = {k for k in weights if k.startswith("normalization")}
    with pytest.raises(ValueError) as err:
        keras_import._fill_variables(module, weights, consumed)
    message = str(err.value)
    assert (
        "batch_stats/block3b/project_bn/var (Keras block3b_project_bn/moving_variance)" in message
    )
    assert "unexpected (Keras weights not used): ['extra_conv/kernel']" in message


def test_cli_end_to_end_and_reload(keras_b0, tmp_path):
    # model.save(.h5) writes the legacy HDF5 layout of the applications' files.
    weights = tmp_path / "b0.h5"
    keras_b0.save(weights)
    output = tmp_path / "converted"
    status = keras_import.main(
        ["--arch=efficientnet_b0", f"--weights={weights}", f"--output={output}"]
    )
    assert status == 0
    metadata = backbone_checkpoint.read_backbone_metadata(str(output))
    assert metadata["arch"] == "efficientnet_b0" and metadata["padding"] == "keras_dynamic"
    assert metadata["input_normalization"] is None  # random Normalization stats
    module, variables = keras_import.load_backbone(str(output))
    _, reference = keras_import.from_keras(keras_b0)
    jax.tree_util.tree_map(np.testing.assert_array_equal, variables, reference)
    x = _pixels(64, 64)
    _assert_parity(keras_b0(x), jax.jit(module.apply)(variables, x)["final"])
    assert set(keras_import.load_backbone_checkpoint(str(output))) == {"params", "batch_stats"}
    with pytest.raises(ValueError, match="already holds a checkpoint"):
        keras_import.convert("efficientnet_b0", str(weights), str(output))
    # A checkpoint that does not fit its recorded arch names the variables.
    metadata["arch"] = "efficientnet_b1"
    (output / backbone_checkpoint.METADATA_FILE).write_text(json.dumps(metadata))
    with pytest.raises(ValueError, match="missing params/block2c/dwconv/kernel"):
        keras_import.load_backbone_checkpoint(str(output))


def test_cli_resnet_and_weights_of_another_architecture(keras_r50, tmp_path):
    weights = tmp_path / "r50.weights.h5"  # the Keras 3 weights format
    keras_r50.save_weights(weights)
    with pytest.raises(
        ValueError, match=r"r50\.weights\.h5 holds weights for resnet50, not --arch=efficientnet_b0"
    ):
        keras_import.main(
            ["--arch=efficientnet_b0", f"--weights={weights}", f"--output={tmp_path / 'o'}"]
        )
    with pytest.raises(ValueError, match="no such file"):
        keras_import.convert("resnet50", str(tmp_path / "missing.h5"), str(tmp_path / "o"))
    # The ResNet checkpoint takes RGB: conv1 reordered, the caffe preset recorded.
    metadata = keras_import.convert("resnet50", str(weights), str(tmp_path / "r50"))
    assert metadata["input_normalization"] == "caffe" and metadata["padding"] is None
    assert backbone_checkpoint.read_backbone_metadata(str(tmp_path / "r50")) == metadata
    variables = keras_import.load_backbone_checkpoint(str(tmp_path / "r50"))
    conv1 = keras_r50.get_layer("conv1_conv").get_weights()[0]
    np.testing.assert_array_equal(variables["params"]["conv1_conv"]["kernel"], conv1[:, :, ::-1])
    np.testing.assert_array_equal(
        variables["batch_stats"]["conv5_block3"]["3_bn"]["var"],
        keras_r50.get_layer("conv5_block3_3_bn").get_weights()[3],
    )


def test_resnet_checkpoint_takes_rgb_with_caffe_preset(keras_r50):
    module, variables = keras_import.caffe_bgr_to_rgb(*keras_import.from_keras(keras_r50))
    preset = input_normalization.INPUT_NORMALIZATIONS["caffe"]
    assert (module.input_scale, module.input_offset) == (preset.scale, preset.offset)
    rgb = _pixels(64, 64)
    # keras.applications.resnet.preprocess_input: RGB -> BGR, minus BGR mean.
    caffe = rgb[..., ::-1] - np.array([103.939, 116.779, 123.68], np.float32)
    _assert_parity(keras_r50(caffe), jax.jit(module.apply)(variables, rgb)["final"])
