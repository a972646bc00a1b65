"""Keras import: parity with keras.applications on randomised weights, the CLI.

Keras models are built with weights=None and then every non-kernel weight is
randomised (kernels already are): biases, BatchNorm gamma/beta and moving
mean AND variance (different positive values, so a mean/variance swap cannot
pass) and the Normalization layer's mean/variance. Nothing is downloaded.
"""

import contextlib
import functools
import json
import os
import re
import subprocess
import sys
import types

import jax
import keras
import numpy as np
import pytest
from configs_for_tests import REPO

from landmark_jax.models import backbone_checkpoint, input_normalization, keras_import

RNG = np.random.default_rng(0)
# The converted model's parity bound, relative to the output's scale.
PARITY_RTOL = 1e-4


def _cli(*args):
    """Runs `python -m landmark_jax.models.keras_import ARGS` as users do."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    cmd = [sys.executable, "-m", "landmark_jax.models.keras_import", *args]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


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


@pytest.fixture(scope="module")
def r50_weights(keras_r50, tmp_path_factory):
    """keras_r50 saved as r50.weights.h5 (the Keras 3 weights format), once:
    the tests that convert it only read it."""
    path = tmp_path_factory.mktemp("r50") / "r50.weights.h5"
    keras_r50.save_weights(path)
    return path


def _pixels(*shape):
    return RNG.uniform(0, 255, (2, *shape, 3)).astype(np.float32)


@functools.partial(jax.jit, static_argnums=0)
def _final(module, variables, x):
    """module.apply(variables, x)['final'], one jitted function for all tests:
    equal modules (a frozen dataclass is the static key) share their compiled
    program, e.g. the imagenet B0 that three tests load, instead of each
    `jax.jit(module.apply)` tracing and lowering it again."""
    return module.apply(variables, x)["final"]


def _assert_parity(expected, got):
    expected, got = np.asarray(expected), np.asarray(got)
    assert expected.shape == got.shape
    scale = np.abs(expected).max()
    assert np.abs(expected - got).max() <= PARITY_RTOL * scale


@pytest.mark.parametrize("fixture", ["keras_b0", "keras_r50"])
def test_parity_at_two_sizes_and_swap_sensitivity(fixture, request):
    keras_model = request.getfixturevalue(fixture)
    module, variables = keras_import.from_keras(keras_model)
    for shape in [(64, 64), (96, 80)]:
        x = _pixels(*shape)
        expected = np.asarray(keras_model(x))
        _assert_parity(expected, _final(module, variables, x))
    # The test can fail: swapping one BN's moving mean and variance breaks it.
    # EfficientNet's last BN (its output is the final map's): the stem's
    # swap fades through 16 random blocks to about the bound, by seed.
    bn = "top_bn" if fixture == "keras_b0" else "conv1_bn"
    stats = variables["batch_stats"][bn]
    swapped = {"mean": stats["var"], "var": stats["mean"] ** 2 + 0.5}  # keep var > 0
    bad = _final(module, {**variables, "batch_stats": {**variables["batch_stats"], bn: swapped}}, x)
    assert np.isfinite(bad).all()
    error = np.abs(expected - bad).max()  # expected: the Keras model on this x
    assert error > 10 * PARITY_RTOL * np.abs(bad).max()


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
    out = _final(module, variables, x)
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


IMAGENET_MEAN = np.asarray(input_normalization.IMAGENET_MEAN_RGB)
IMAGENET_STD = np.asarray(input_normalization.IMAGENET_STD_RGB)


def _keras_pixels_for_imagenet(x, mean, variance):
    """x' such that Keras's (x'/255 - mean)/sqrt(variance) is (x/255 - m)/s.

    (m, s: the ImageNet mean/std.) Feeding x' to a Keras EfficientNet gives
    its function of correctly normalised x, whatever its Normalization holds:
    a reference that shares no code with the converter.
    """
    wanted = (x.astype(np.float64) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD
    return (255.0 * (mean + np.sqrt(variance) * wanted)).astype(np.float32)


def _set_normalization(model, mean, variance):
    layer = next(n for n in model.layers if type(n).__name__ == "Normalization")
    for w in layer.weights:
        if w.name in ("mean", "variance"):
            values = mean if w.name == "mean" else variance
            w.assign(np.broadcast_to(values, tuple(w.shape)).astype(np.float32))
    layer.finalize_state()


@contextlib.contextmanager
def _as_released(keras_b0):
    """keras_b0 as the released ImageNet files hold it, restored on exit.

    Its Normalization holds mean = ImageNet mean and variance = ImageNet
    *std* (tensorflow/tensorflow#49930); the other weights are keras_b0's.
    keras_b0 itself rather than a copy: building another EfficientNetB0
    costs about a second.
    """
    layer = next(n for n in keras_b0.layers if type(n).__name__ == "Normalization")
    saved = {w.name: np.asarray(w) for w in layer.weights}
    _set_normalization(keras_b0, IMAGENET_MEAN, IMAGENET_STD)
    try:
        yield keras_b0
    finally:
        for w in layer.weights:
            w.assign(saved[w.name])
        layer.finalize_state()


@pytest.fixture(scope="module")
def released_b0(keras_b0, tmp_path_factory):
    """The path of an .h5 laid out like the released ImageNet files.

    keras_b0 `_as_released`, saved with model.save(.h5), the legacy HDF5
    layout of the applications' files, which
    EfficientNetB0(include_top=False, weights=PATH) loads.
    """
    path = tmp_path_factory.mktemp("released") / "efficientnetb0_notop.h5"
    with _as_released(keras_b0) as model:
        model.save(path)
    return path


@pytest.mark.e2e
def test_released_h5_records_imagenet_and_reproduces_it(
    released_b0, keras_b0, tmp_path, monkeypatch, capsys
):
    weights = released_b0
    output = tmp_path / "converted"
    # The program's main (its flag parsing is test_cli_resnet...'s, in a
    # process of its own): the metadata printed as JSON, status 0.
    flags = types.SimpleNamespace(
        arch="efficientnet_b0", weights=str(weights), output=str(output), input_normalization=None
    )
    monkeypatch.setattr(keras_import, "FLAGS", flags)
    assert keras_import.main(["keras_import"]) == 0
    assert json.loads(capsys.readouterr().out)["input_normalization"] == "imagenet"
    metadata = backbone_checkpoint.read_backbone_metadata(str(output))
    preset = input_normalization.INPUT_NORMALIZATIONS["imagenet"]
    assert metadata["input_normalization"] == "imagenet"
    assert metadata["input_scale"] == list(preset.scale)
    assert metadata["input_offset"] == list(preset.offset)
    assert metadata["arch"] == "efficientnet_b0" and metadata["padding"] == "keras_dynamic"
    # Provenance keeps what the Keras model itself computed: (x/255-mean)/sqrt(std).
    np.testing.assert_allclose(
        metadata["source"]["keras_input_affine"]["scale"],
        1 / (255 * np.sqrt(IMAGENET_STD)),
        rtol=1e-6,
    )
    module, variables = backbone_checkpoint.load_backbone(str(output))
    assert (module.input_scale, module.input_offset) == (preset.scale, preset.offset)
    x = _pixels(64, 64)
    with _as_released(keras_b0) as keras_model:  # the model the file was saved from
        expected = keras_model(_keras_pixels_for_imagenet(x, IMAGENET_MEAN, IMAGENET_STD))
        on_x_itself = keras_model(x)
        _, reference = keras_import.from_keras(keras_model)
    _assert_parity(expected, _final(module, variables, x))
    # The test can fail: the Keras model on x itself (the old, wrong affine).
    with pytest.raises(AssertionError):
        _assert_parity(expected, on_x_itself)
    assert "released Keras EfficientNet .h5" in metadata["source"]["input_normalization_from"]
    # The variables are the Keras model's, unchanged.
    jax.tree_util.tree_map(np.testing.assert_array_equal, variables, reference)
    # load_backbone's variables are load_backbone_checkpoint's (its [1]).
    assert set(variables) == {"params", "batch_stats"}
    with pytest.raises(ValueError, match="already holds a checkpoint"):
        keras_import.convert("efficientnet_b0", str(weights), str(output))
    # A checkpoint that does not fit its recorded arch names the variables.
    metadata["arch"] = "efficientnet_b1"
    (output / backbone_checkpoint.METADATA_FILE).write_text(json.dumps(metadata))
    with pytest.raises(ValueError, match="missing params/block2c/dwconv/kernel"):
        backbone_checkpoint.load_backbone_checkpoint(str(output))


@pytest.mark.e2e
def test_released_h5_as_path_equals_weights_imagenet(released_b0, tmp_path, monkeypatch):
    """--weights=PATH gives exactly what --weights=imagenet gives for that file."""
    weights = released_b0
    # weights='imagenet' without the internet: Keras's download returns the file.
    from keras.src.applications import efficientnet as keras_efficientnet

    monkeypatch.setattr(
        keras_efficientnet.file_utils, "get_file", lambda *args, **kwargs: str(weights)
    )
    from_imagenet = keras_import.convert("efficientnet_b0", "imagenet", str(tmp_path / "i"))
    from_path = keras_import.convert("efficientnet_b0", str(weights), str(tmp_path / "p"))
    for key in ("arch", "input_normalization", "input_scale", "input_offset", "padding"):
        assert from_imagenet[key] == from_path[key], key
    assert from_path["input_normalization"] == "imagenet"
    module, variables = backbone_checkpoint.load_backbone(str(tmp_path / "p"))
    jax.tree_util.tree_map(
        np.testing.assert_array_equal,
        backbone_checkpoint.load_backbone_checkpoint(str(tmp_path / "i")),
        variables,
    )
    # And both reproduce the weights='imagenet' Keras model (with its extra Rescaling).
    keras_imagenet = keras.applications.EfficientNetB0(include_top=False, weights="imagenet")
    assert sum(type(n).__name__ == "Rescaling" for n in keras_imagenet.layers) == 2
    x = _pixels(64, 64)
    _assert_parity(keras_imagenet(x), _final(module, variables, x))


@pytest.mark.e2e
def test_unrecognised_affine_needs_the_flag(keras_b0, tmp_path):
    # keras_b0's Normalization holds random statistics: no known convention.
    weights = tmp_path / "b0.h5"
    keras_b0.save(weights)
    with pytest.raises(ValueError, match=r"cannot be established.*--input_normalization=PRESET"):
        keras_import.convert("efficientnet_b0", str(weights), str(tmp_path / "o"))
    assert not (tmp_path / "o").exists()
    with pytest.raises(ValueError, match="unknown input normalization 'imagenett'"):
        keras_import.convert("efficientnet_b0", str(weights), str(tmp_path / "o"), "imagenett")
    # With the flag: the stated preset, and the Keras function of input so normalised.
    output = tmp_path / "stated"
    keras_import.convert("efficientnet_b0", str(weights), str(output), "imagenet")
    metadata = backbone_checkpoint.read_backbone_metadata(str(output))
    preset = input_normalization.INPUT_NORMALIZATIONS["imagenet"]
    assert metadata["input_normalization"] == "imagenet"
    assert (metadata["input_scale"], metadata["input_offset"]) == (
        list(preset.scale),
        list(preset.offset),
    )
    assert metadata["source"]["input_normalization_from"] == "--input_normalization"
    module, variables = backbone_checkpoint.load_backbone(str(output))
    layer = next(n for n in keras_b0.layers if type(n).__name__ == "Normalization")
    mean = np.asarray(layer.mean, np.float64).ravel()
    variance = np.asarray(layer.variance, np.float64).ravel()
    x = _pixels(64, 64)
    _assert_parity(
        keras_b0(_keras_pixels_for_imagenet(x, mean, variance)),
        _final(module, variables, x),
    )


@pytest.mark.e2e
def test_contradicting_flag_is_an_error(released_b0, r50_weights, tmp_path):
    weights = released_b0
    with pytest.raises(
        ValueError, match=r"--input_normalization=caffe contradicts the 'imagenet' normalisation"
    ):
        keras_import.convert("efficientnet_b0", str(weights), str(tmp_path / "o"), "caffe")
    assert not (tmp_path / "o").exists()
    # Agreeing with the established convention is fine.
    metadata = keras_import.convert(
        "efficientnet_b0", str(weights), str(tmp_path / "ok"), input_normalization="imagenet"
    )
    assert metadata["input_normalization"] == "imagenet"
    with pytest.raises(
        ValueError, match=r"--input_normalization=imagenet contradicts the 'caffe' normalisation"
    ):
        keras_import.convert("resnet50", str(r50_weights), str(tmp_path / "r"), "imagenet")


def test_save_checks_the_recorded_preset(keras_b0, tmp_path):
    module, variables = keras_import.from_keras(keras_b0)  # random affine
    with pytest.raises(ValueError, match="is not the 'imagenet' preset"):
        backbone_checkpoint.save_backbone_checkpoint(
            str(tmp_path / "o"),
            "efficientnet_b0",
            module,
            variables,
            {},
            input_normalization_name="imagenet",
        )


@pytest.mark.e2e
def test_cli_resnet_and_weights_of_another_architecture(keras_r50, r50_weights, tmp_path):
    weights = r50_weights  # the Keras 3 weights format
    # The command line prints the error in one line and exits with status 2.
    result = _cli("--arch=efficientnet_b0", f"--weights={weights}", f"--output={tmp_path / 'o'}")
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert re.search(
        r"error: .*r50\.weights\.h5 holds weights for resnet50, not --arch=efficientnet_b0",
        result.stderr,
    )
    with pytest.raises(ValueError, match="no such file"):
        keras_import.convert("resnet50", str(tmp_path / "missing.h5"), str(tmp_path / "o"))
    # The ResNet checkpoint takes RGB: conv1 reordered, the caffe preset recorded.
    metadata = keras_import.convert("resnet50", str(weights), str(tmp_path / "r50"))
    assert metadata["input_normalization"] == "caffe" and metadata["padding"] is None
    assert backbone_checkpoint.read_backbone_metadata(str(tmp_path / "r50")) == metadata
    variables = backbone_checkpoint.load_backbone_checkpoint(str(tmp_path / "r50"))
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
    _assert_parity(keras_r50(caffe), _final(module, variables, rgb))
