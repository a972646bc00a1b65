"""A run's model describes itself: the input convention of its weights is
resolved before training, recorded in config.json, inherited by the next
stage and used by evaluation, and every disagreement is an error."""

import json
import os
import shutil

import jax
import numpy as np
import pytest
from configs_for_tests import load_config, set_keys

from landmark_jax import trainer
from landmark_jax.models import backbone_checkpoint, backbones
from landmark_jax.models.factory import create_model
from landmark_jax.retrieval import baselines, restored_runs
from landmark_jax.training import train_steps
from landmark_jax.workdir import checkpointing, run_config

from backbone_variables import random_variables

pytestmark = pytest.mark.e2e


def _config(data_dir: str, **overrides):
    config = load_config("demo", "smoke")
    config.data_dir = data_dir
    config.total_steps = 1
    config.log_every_steps = 1
    config.checkpoint_every_steps = 1
    # lr 0 keeps the loaded weights as they are, so every stage holds them.
    config.optimizer.schedule = "constant"
    config.optimizer.learning_rate = 0.0
    return set_keys(config, **overrides)


def _weights(root, arch: str, preset: str, image_size: int, **module_options) -> str:
    """A backbone checkpoint as keras_import writes it, with random weights."""
    module = backbones.create_backbone(arch, input_normalization=preset, **module_options)
    path = str(root / f"weights-{arch}")
    backbone_checkpoint.save_backbone_checkpoint(
        path,
        arch,
        module,
        random_variables(module, (1, image_size, image_size, 3)),
        {"test": "random weights"},
        input_normalization_name=preset,
    )
    return path


def _chain(demo, root, arch: str, weights: str, image_size: int) -> tuple[str, str]:
    """Stage 1 from the converted weights, stage 2 from stage 1 (nothing repeated)."""
    stage1, stage2 = str(root / "stage1"), str(root / "stage2")
    common = {"model.backbone": arch, "image_size": image_size}
    trainer.train_and_evaluate(
        _config(demo["full"], **common, **{"init.backbone": weights}), stage1
    )
    trainer.train_and_evaluate(
        _config(demo["full"], **common, **{"init.checkpoint": stage1, "init.carry": "all"}),
        stage2,
    )
    return stage1, stage2


@pytest.fixture(scope="module")
def caffe_resnet(demo, tmp_path_factory):
    root = tmp_path_factory.mktemp("caffe_resnet")
    weights = _weights(root, "resnet_tiny", "caffe", 32)
    stage1, stage2 = _chain(demo, root, "resnet_tiny", weights, 32)
    return {"weights": weights, "stage1": stage1, "stage2": stage2, "image_size": 32}


@pytest.fixture(scope="module")
def keras_padded_efficientnet(demo, tmp_path_factory):
    # 48 px: the stride-2 convs meet odd maps (3 x 3 before the last), where
    # 'keras_dynamic' and TF 'same' padding differ.
    root = tmp_path_factory.mktemp("keras_padding")
    weights = _weights(root, "efficientnet_tiny", "imagenet", 48, padding="keras_dynamic")
    stage1, stage2 = _chain(demo, root, "efficientnet_tiny", weights, 48)
    return {"weights": weights, "stage1": stage1, "stage2": stage2, "image_size": 48}


def _model_variables(workdir: str) -> dict:
    return train_steps.model_variables(checkpointing.load_stage(workdir))


def _embed(model, variables, images) -> np.ndarray:
    out = np.asarray(jax.jit(model.apply)(variables, images), np.float64)
    return out / np.linalg.norm(out, axis=1, keepdims=True)


@pytest.mark.parametrize(
    ("chain", "key", "value", "other"),
    [
        ("caffe_resnet", "input_normalization", "caffe", "imagenet"),
        ("keras_padded_efficientnet", "padding", "keras_dynamic", "same"),
    ],
)
def test_the_convention_holds_in_both_stages_and_in_evaluation(
    demo, request, chain, key, value, other
):
    """Same weights, same image: the same embedding from stage 1's model, stage
    2's model and the model evaluation rebuilds; the other convention gives
    another embedding, so the check can fail."""
    run = request.getfixturevalue(chain)
    for stage in ("stage1", "stage2"):
        assert run_config.read_run_config(run[stage]).model[key] == value
    size = run["image_size"]
    images = np.random.default_rng(0).integers(0, 256, (4, size, size, 3), dtype=np.uint8)
    variables = _model_variables(run["stage1"])
    # Stage 1 trained (lr 0) on exactly the converted weights.
    loaded = backbone_checkpoint.load_backbone_checkpoint(run["weights"])["params"]
    for a, b in zip(
        jax.tree.leaves(loaded), jax.tree.leaves(variables["params"]["backbone"]), strict=True
    ):
        np.testing.assert_array_equal(a, b)

    stage1_model = create_model(run_config.read_run_config(run["stage1"]).model)
    stage2_model = create_model(run_config.read_run_config(run["stage2"]).model)
    # Evaluation with the plain demo config (another backbone, no init keys):
    # the model comes from the workdir's config.json.
    eval_config = run_config.evaluation_config(load_config("demo", "smoke"), run["stage2"])
    eval_model = restored_runs.load_trained_model(eval_config, run["stage2"]).module
    attributes = ("input_scale", "input_offset") if key == "input_normalization" else (key,)
    for attribute in attributes:
        assert getattr(eval_model.backbone, attribute) == getattr(stage1_model.backbone, attribute)
    first = _embed(stage1_model, variables, images)
    np.testing.assert_allclose(_embed(stage2_model, variables, images), first, atol=1e-6)
    np.testing.assert_allclose(_embed(eval_model, variables, images), first, atol=1e-6)

    wrong = create_model({**run_config.read_run_config(run["stage1"]).model.to_dict(), key: other})
    cosine = np.sum(_embed(wrong, variables, images) * first, axis=1)
    assert cosine.min() < 0.999, cosine


def test_a_config_naming_another_convention_than_its_weights_is_an_error(
    demo, caffe_resnet, tmp_path
):
    config = _config(
        demo["full"],
        **{
            "model.backbone": "resnet_tiny",
            "model.input_normalization": "imagenet",
            "init.backbone": caffe_resnet["weights"],
        },
    )
    with pytest.raises(ValueError, match=r"(?s)'imagenet'.*init\.backbone.*'caffe'"):
        trainer.train_and_evaluate(config, str(tmp_path / "run"))
    assert not os.path.exists(tmp_path / "run" / "checkpoints")


def test_a_stage_naming_another_padding_than_the_previous_stage_is_an_error(
    demo, keras_padded_efficientnet
):
    config = _config(
        demo["full"],
        **{
            "model.backbone": "efficientnet_tiny",
            "model.padding": "same",
            "init.checkpoint": keras_padded_efficientnet["stage1"],
        },
    )
    with pytest.raises(ValueError, match=r"(?s)model\.padding.*'same'.*previous stage.*keras"):
        run_config.resolve_training_config(config)
    # Named the same, it is accepted; left unset, it is inherited.
    config.model.padding = "keras_dynamic"
    assert run_config.resolve_training_config(config).model.padding == "keras_dynamic"
    config.model.padding = None
    assert run_config.resolve_training_config(config).model.padding == "keras_dynamic"


def test_weights_and_previous_stage_must_agree(demo, caffe_resnet, keras_padded_efficientnet):
    # Caffe ResNet weights named next to a previous stage on imagenet input.
    other = _config(demo["full"], **{"model.backbone": "resnet_tiny"})
    other.init.backbone = caffe_resnet["weights"]
    other.init.checkpoint = keras_padded_efficientnet["stage1"]
    with pytest.raises(ValueError, match=r"(?s)input_normalization.*'caffe'.*previous.*'imagenet'"):
        run_config.resolve_training_config(other)


def test_resuming_with_another_convention_is_an_error(demo, caffe_resnet):
    config = _config(
        demo["full"],
        total_steps=2,
        **{"model.backbone": "resnet_tiny", "model.input_normalization": "imagenet"},
    )
    with pytest.raises(ValueError, match=r"was trained with model\.input_normalization='caffe'"):
        trainer.train_and_evaluate(config, caffe_resnet["stage1"])


def test_weights_without_a_recorded_preset_are_refused(demo, caffe_resnet, tmp_path):
    """A backbone.json with a null input_normalization: not guessed from the
    recorded affine, but named with the command that converts again."""
    weights = str(tmp_path / "old")
    shutil.copytree(caffe_resnet["weights"], weights)
    path = os.path.join(weights, backbone_checkpoint.METADATA_FILE)
    metadata = json.load(open(path))
    metadata.update(input_normalization=None)
    json.dump(metadata, open(path, "w"))
    config = _config(demo["full"], **{"model.backbone": "resnet_tiny", "init.backbone": weights})
    refused = r"backbone.json does not record input_normalization.*keras_import"
    with pytest.raises(ValueError, match=refused):
        run_config.resolve_training_config(config)


def test_runs_that_do_not_record_a_convention_are_refused(demo, caffe_resnet, tmp_path):
    """A config.json without the input convention: named, with the way out
    (train again), whether it is a previous stage or the evaluated run."""
    old = str(tmp_path / "old_run")
    os.makedirs(old)
    saved = json.load(open(os.path.join(caffe_resnet["stage1"], run_config.CONFIG_FILE)))
    for key in run_config.CONVENTION_KEYS:
        del saved["model"][key]
    json.dump(saved, open(os.path.join(old, run_config.CONFIG_FILE), "w"))
    refused = r"config.json does not record model\.input_normalization.*Train the run again"
    config = _config(demo["full"], **{"model.backbone": "resnet_tiny", "init.checkpoint": old})
    config.model.input_normalization = "caffe"  # the config cannot stand in for the record
    with pytest.raises(ValueError, match=refused):
        run_config.resolve_training_config(config)
    with pytest.raises(ValueError, match=refused):
        run_config.evaluation_config(_config(demo["full"]), old)


def test_evaluation_takes_data_and_eval_from_the_command_line_only(demo, caffe_resnet, tmp_path):
    cli = _config(str(tmp_path / "other_data"), image_size=64)
    cli.eval.k = 7
    config = run_config.evaluation_config(cli, caffe_resnet["stage2"])
    assert config.data_dir == str(tmp_path / "other_data") and config.eval.k == 7
    assert config.image_size == 32 and config.model.backbone == "resnet_tiny"
    # Command-line model keys must agree with the workdir's config.json.
    same = {"model.input_normalization": "caffe", "model.dolg.dilations": (6, 12, 18)}
    run_config.evaluation_config(cli, caffe_resnet["stage2"], same)
    with pytest.raises(ValueError, match=r"input_normalization='imagenet' but .*config\.json"):
        run_config.evaluation_config(
            cli, caffe_resnet["stage2"], {"model.input_normalization": "imagenet"}
        )
    with pytest.raises(FileNotFoundError, match="not a training workdir"):
        run_config.evaluation_config(cli, str(tmp_path))


def test_the_untrained_baseline_is_each_stage_s_step_0_model(caffe_resnet):
    """Both stages trained with lr 0, so each kept its step-0 parameters:
    stage 1 the converted backbone and its seed's neck, stage 2 stage 1's
    model. The evaluation's untrained baseline must rebuild exactly those."""
    for stage in ("stage1", "stage2"):
        workdir = caffe_resnet[stage]
        config = run_config.evaluation_config(load_config("demo", "smoke"), workdir)
        untrained = baselines.untrained_model(config, workdir)
        trained = _model_variables(workdir)["params"]
        paths = [p for p, _ in jax.tree_util.tree_leaves_with_path(trained)]
        assert paths == [
            p for p, _ in jax.tree_util.tree_leaves_with_path(untrained.variables["params"])
        ]
        for path, a, b in zip(
            paths,
            jax.tree.leaves(untrained.variables["params"]),
            jax.tree.leaves(trained),
            strict=True,
        ):
            np.testing.assert_array_equal(a, b, err_msg=f"{stage} {jax.tree_util.keystr(path)}")
