"""SuperGlobal's pooling options at extraction (retrieval/superglobal_extraction.py): the
extraction against the model applied by hand with the numpy references, off leaves the
descriptors as they were, the cache and the export record the options, bad keys named."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import superglobal_reference as ref

from landmark_jax import config_lib
from landmark_jax.data import input_pipeline
from landmark_jax.models import factory
from landmark_jax.retrieval import (
    baselines,
    ensemble,
    eval_config,
    evaluation,
    extract,
    superglobal_extraction,
)
from landmark_jax.serving import descriptor_function

from backbone_variables import random_variables

SCALES = (0.75, 1.0)
ALL_ON = {"gem_plus": True, "regional_gem": True, "scale_gem": True, "relu_plus": True}


def _config(data_dir, backbone="resnet_tiny", **eval_keys):
    config = config_lib.base_config()
    config.model = factory.resolve_model_config(
        {
            "name": "global",
            "backbone": backbone,
            "pooling": "gem",
            "neck": "dense",
            "embedding_dim": 8,
            "descriptor": "embedding",
        }
    )
    config.data_dir = data_dir
    config.image_size = 48  # final maps of 2 x 2 at 36 and 48 px: GeM+ and Regional-GeM show
    config.batch_size = 8
    config.eval.scales = SCALES
    config.eval.update(eval_keys)
    return config


@pytest.fixture(scope="module")
def model(tiny_gldv2_tfrecords):
    """A resnet_tiny GlobalModel (GeM, p = 3; a dense neck) with random weights
    on the tiny GLDv2 build, whose index split has 21 images."""
    config = _config(tiny_gldv2_tfrecords[1])
    module = factory.create_model(config.model)
    variables = random_variables(module, (1, 48, 48, 3))
    variables["params"]["pool"]["p"] = np.float32(3.0)
    return extract.TrainedModel(config, "", 0, module, variables, {})


def _by_hand(model, alpha=0.014):
    """The index split's descriptors as SuperGlobal's code makes them: ReLU+ in
    the backbone, Regional-GeM and GeM+ on its final map (numpy), the neck,
    Scale-GeM over the scales (numpy), normalised."""
    params, stats = model.variables["params"], model.variables["batch_stats"]
    backbone = model.module.backbone.clone(relu_plus=alpha)
    backbone_variables = {"params": params["backbone"], "batch_stats": stats["backbone"]}
    final = jax.jit(lambda x: backbone.apply(backbone_variables, x)["final"])
    per_scale = []
    for scale in SCALES:
        ds, _ = input_pipeline.create_eval_dataset(
            model.config.data_dir,
            "index",
            image_size=round(model.config.image_size * scale),
            local_batch_size=32,
        )
        images = next(ds.as_numpy_iterator())["image"][:21]
        fmap = final(images)
        assert fmap.shape[1:3] == (2, 2)
        pooled = ref.gemp(ref.rgem(fmap))
        per_scale.append(pooled @ np.float64(params["neck"]["dense"]["kernel"]))
        per_scale[-1] += params["neck"]["dense"]["bias"]
    combined = ref.sgem(np.stack(per_scale))
    return combined / np.linalg.norm(combined, axis=1, keepdims=True)


def test_extraction_with_the_options_is_the_model_by_hand_and_off_is_unchanged(model):
    config = _config(model.config.data_dir, **ALL_ON)
    eval_config.validate_eval_config(config)
    options = extract.extraction_options(config, model)
    assert options["superglobal"] == {
        "gem_plus_p": 4.6,
        "regional_gem": {"p": 2.5, "size": 5},
        "scale_gem": True,
        "relu_plus_alpha": 0.014,
    }
    on = extract.extract(model, "index", **options)
    assert on.embeddings.shape == (21, 8)
    np.testing.assert_allclose(on.embeddings, _by_hand(model), atol=1e-5)

    # Off (the defaults): the model itself, the scales summed; bit for bit what
    # extract gives without the options.
    off_options = extract.extraction_options(_config(model.config.data_dir), model)
    assert off_options["superglobal"] == superglobal_extraction.OFF
    assert superglobal_extraction.with_options(model.module, off_options["superglobal"]) is (
        model.module
    )
    off = extract.extract(model, "index", **off_options)
    without = extract.extract(model, "index", scales=SCALES)
    np.testing.assert_array_equal(off.embeddings, without.embeddings)
    assert np.abs(on.embeddings - off.embeddings).max() > 0.01


class ColourMoments(nn.Module):
    """A cheap stand-in model: each channel's mean and mean square over the image."""

    @nn.compact
    def __call__(self, images):
        x = images.astype(jnp.float32) / 255.0
        return jnp.concatenate([x.mean(axis=(1, 2)), (x * x).mean(axis=(1, 2))], axis=-1)


def test_aspect_kept_extraction_combines_scales_by_scale_gem(model):
    """resize='longer_side' (shape buckets): Scale-GeM of the scales' descriptors,
    each as a one-scale extraction gives it."""
    moments = extract.TrainedModel(model.config, "", 0, ColourMoments(), {}, {})
    kept = {"resize": "longer_side", "image_size": 24, "size_multiple": 8}
    scale_gem = {**superglobal_extraction.OFF, "scale_gem": True}
    combined = extract.extract(moments, "index", scales=SCALES, superglobal=scale_gem, **kept)
    alone = [extract.extract(moments, "index", scales=(s,), **kept).embeddings for s in SCALES]
    expected = ref.sgem(np.stack(alone))
    expected /= np.linalg.norm(expected, axis=1, keepdims=True)
    np.testing.assert_allclose(combined.embeddings, expected, atol=1e-6)
    summed = extract.extract(moments, "index", scales=SCALES, **kept).embeddings
    assert np.abs(combined.embeddings - summed).max() > 1e-4


def test_embedding_cache_records_the_options(model, tmp_path, monkeypatch):
    """embed_split re-extracts when an option changes, not when the parameter
    of an option that is off does."""
    calls = []

    def fake_extract(trained, split, **kwargs):
        calls.append(kwargs["superglobal"])
        return extract.Embeddings(np.array(["a"]), np.ones((1, 8), np.float32), np.array([-1]))

    monkeypatch.setattr(extract, "extract", fake_extract)
    members = [ensemble.EnsembleMember(str(tmp_path), 1.0)]

    def embed(**eval_keys):
        config = _config(model.config.data_dir, **eval_keys)
        evaluation.embed_split(config, str(tmp_path), "index", members, [model], None)
        cached = extract.Embeddings.load(str(tmp_path / "eval" / "embeddings-index-0.npz"))
        return cached.settings["superglobal"]

    assert embed() == superglobal_extraction.OFF and len(calls) == 1
    assert embed(gem_plus_p=3.0) == superglobal_extraction.OFF and len(calls) == 1  # off: reused
    assert embed(gem_plus=True)["gem_plus_p"] == 4.6 and len(calls) == 2
    assert embed(gem_plus=True, gem_plus_p=5.0)["gem_plus_p"] == 5.0 and len(calls) == 3
    assert embed(relu_plus=True)["relu_plus_alpha"] == 0.014 and len(calls) == 4


def test_export_builds_the_model_with_the_options(model):
    member = ensemble.EnsembleMember("run", 1.0)
    on = descriptor_function.exported_member(
        model, member, _config(model.config.data_dir, **ALL_ON)
    )
    assert on.module.pool_override.gem_plus_p == 4.6
    assert on.module.pool_override.regional_gem_p == 2.5
    assert on.module.backbone.relu_plus == 0.014
    assert on.identity()["superglobal"]["scale_gem"] is True
    off = descriptor_function.exported_member(model, member, _config(model.config.data_dir))
    assert off.module.pool_override is None and off.module.backbone.relu_plus is None
    assert "superglobal" not in off.identity()  # as before the options existed


def test_options_a_model_cannot_take_are_refused_by_name():
    options = superglobal_extraction.options_from_config
    efficientnet = factory.create_model(_config("", backbone="efficientnet_tiny").model)
    with pytest.raises(ValueError, match=r"config\.eval\.relu_plus=True: .*EfficientNet"):
        superglobal_extraction.with_options(efficientnet, options(_config("", relu_plus=True)))
    # GeM+ and Regional-GeM act on an EfficientNet, and on a GAP model (the
    # code replaces whatever pooling was trained).
    pooled = superglobal_extraction.with_options(
        efficientnet.clone(pooling="gap"), options(_config("", gem_plus=True))
    )
    assert pooled.pool_override.gem_plus_p == 4.6
    raw = baselines.RawPixels()
    with pytest.raises(ValueError, match=r"config\.eval\.regional_gem=True: .*RawPixels has none"):
        superglobal_extraction.with_options(raw, options(_config("", regional_gem=True)))
    assert superglobal_extraction.with_options(raw, options(_config(""))) is raw


@pytest.mark.parametrize(
    "keys, match",
    [
        ({"gem_plus": None}, r"config\.eval\.gem_plus=None: expected True or False"),
        ({"gem_plus_p": 0.0}, r"config\.eval\.gem_plus_p=0\.0: expected a finite number > 0"),
        ({"relu_plus_alpha": -0.1}, r"config\.eval\.relu_plus_alpha=-0\.1"),
        ({"regional_gem_size": 4}, r"config\.eval\.regional_gem_size=4: expected an odd"),
        ({"scale_gem": True, "scales": (1.0,)}, r"config\.eval\.scale_gem=True combines"),
    ],
)
def test_bad_keys_are_named(keys, match):
    with pytest.raises(ValueError, match=match):
        eval_config.validate_eval_config(_config("", **keys))
