"""The trainer end to end on small demo data, on the 8-device CPU mesh."""

import json
import os

import numpy as np
import orbax.checkpoint as ocp
import pytest
from configs_for_tests import config_for, load_config, losses_of

from landmark_jax import trainer, training_summary
from landmark_jax.data import data_format
from landmark_jax.training import train_steps
from landmark_jax.workdir import checkpointing


def demo_config(arg: str):
    return load_config("demo", arg)


def restore_params(workdir: str) -> dict:
    return checkpointing.load_stage(workdir)


@pytest.mark.e2e
def test_training_lowers_the_loss(demo, tmp_path):
    # config_for's program as it is (the demo smoke model, AdaCos, lr 0.1),
    # which the checkpoint and fault tests train too, so it compiles once:
    # over 30 steps the loss falls to 0.63-0.69 of its step-5 value (seeds
    # 0-1, 2 cores); the logging and validation keys change no program.
    config = config_for(
        demo["full"],
        total_steps=30,
        log_every_steps=5,
        **{
            "val.every_steps": 30,
            "val.retrieval_solution": f"{demo['raw']}/retrieval_solution.csv",
        },
    )
    last = trainer.train_and_evaluate(config, str(tmp_path))
    losses = list(losses_of(str(tmp_path)).values())
    assert len(losses) == 6
    assert losses[-1] < 0.8 * losses[0], losses
    assert set(last) >= {
        "loss",
        "learning_rate",
        "images_per_sec",
        "grad_norm",
        "val_loss",
        "val_accuracy",
        "val_map@100",
    }
    # The in-training retrieval mAP is the evaluation's own score of the
    # step-30 parameters (the last checkpoint).
    from landmark_jax.retrieval import restored_runs, validation
    from landmark_jax.workdir import run_config

    saved = run_config.evaluation_config(config, str(tmp_path))
    assert last["val_map@100"] == pytest.approx(
        validation.retrieval_map(
            restored_runs.load_trained_model(saved, str(tmp_path)),
            data_dir=demo["full"],
            query_split="test",
            index_split="index",
            solution_path=f"{demo['raw']}/retrieval_solution.csv",
        ),
        abs=1e-6,
    )
    assert os.path.isdir(tmp_path / "tensorboard")
    saved = json.load(open(tmp_path / "config.json"))
    assert saved["total_steps"] == 30 and saved["data_dir"] == demo["full"]
    summary = training_summary.summarize(str(tmp_path))
    assert f"train loss {losses[0]:.3f} (step 5) -> {losses[-1]:.3f} (step 30)" in summary
    assert summary.rstrip().endswith("30]")  # the last checkpoint is the last step

    # A finished run returns at once, before it builds or restores a model.
    def no_model(*args, **kwargs):
        raise AssertionError("a finished run built its model")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train_steps, "create_model", no_model)
        assert trainer.train_and_evaluate(config, str(tmp_path)) == {}


@pytest.fixture(scope="module")
def subset_stage1(demo, tmp_path_factory):
    """A first stage on the 6-landmark subset, 2 steps (tests only read it)."""
    workdir = str(tmp_path_factory.mktemp("subset") / "stage1")
    trainer.train_and_evaluate(config_for(demo["subset"], total_steps=2), workdir)
    return workdir


@pytest.mark.e2e
def test_stages_carry_weights_into_a_new_head_and_a_new_resolution(demo, subset_stage1, tmp_path):
    stage1 = subset_stage1
    stage2, stage3 = (str(tmp_path / f"stage{i}") for i in (2, 3))
    # A learning rate of 0 keeps the carried weights as they were loaded.
    trainer.train_and_evaluate(
        config_for(
            demo["full"],
            total_steps=1,
            **{
                "init.checkpoint": stage1,
                "init.carry": "model",
                "optimizer.learning_rate": 0.0,
            },
        ),
        stage2,
    )
    first, second = restore_params(stage1), restore_params(stage2)
    for a, b in zip(
        _leaves(first["params"]["model"]), _leaves(second["params"]["model"]), strict=True
    ):
        np.testing.assert_array_equal(a, b)
    num_full = data_format.read_num_classes(demo["full"])
    num_subset = data_format.read_num_classes(demo["subset"])
    assert num_full > num_subset
    # The new head was initialised for the new class count.
    kernel = second["params"]["head"]["kernel"]
    assert kernel.shape[1] >= num_full
    assert not np.array_equal(
        kernel[:, :num_subset], first["params"]["head"]["kernel"][:, :num_subset]
    )

    # Higher resolution, everything carried (head included).
    trainer.train_and_evaluate(
        config_for(
            demo["full"],
            total_steps=1,
            image_size=64,
            **{
                "init.checkpoint": stage2,
                "init.carry": "all",
                "optimizer.learning_rate": 0.0,
            },
        ),
        stage3,
    )
    third = restore_params(stage3)
    for a, b in zip(_leaves(second["params"]), _leaves(third["params"]), strict=True):
        np.testing.assert_array_equal(a, b)


def _leaves(tree):
    import jax

    return jax.tree.leaves(tree)


@pytest.mark.e2e
def test_shape_mismatch_names_the_parameter_and_the_config_key(demo, subset_stage1, tmp_path):
    stage1 = subset_stage1
    recorded = open(os.path.join(stage1, "config.json")).read()
    config = config_for(
        demo["subset"], total_steps=1, **{"init.checkpoint": stage1, "init.carry": "all"}
    )
    config.model.embedding_dim = 32
    with pytest.raises(ValueError) as e:
        trainer.train_and_evaluate(config, str(tmp_path / "stage2"))
    message = str(e.value)
    assert "params/model/neck" in message and "model.embedding_dim" in message
    # Resuming a workdir with a changed config names the parameter too (one
    # step more than it has: a finished run would return before any restore).
    config = config_for(demo["subset"], total_steps=3)
    config.model.embedding_dim = 32
    with pytest.raises(
        ValueError,
        match=r"(?s)params/head/kernel: checkpoint \(64, \d+\) vs "
        r"model \(32, \d+\)",
    ):
        trainer.train_and_evaluate(config, stage1)
    # The failed start left the workdir's record of its model as it was.
    assert open(os.path.join(stage1, "config.json")).read() == recorded


@pytest.mark.e2e
@pytest.mark.parametrize(
    ("overrides", "error", "match"),
    [
        ({"batch_size": 12}, ValueError, "batch_size=12 must be a positive multiple of the 8"),
        ({"image_size": 16}, ValueError, "image size 16 is too small for resnet_tiny"),
        (
            {"num_classes": 3},
            ValueError,
            "config.num_classes=3 but the data set in .* has 10 classes",
        ),
        ({"init.checkpoint": "/nonexistent/run"}, ValueError, "init.checkpoint.*does not exist"),
        ({"head.scale": "adacos"}, ValueError, "head.scale='adacos'; valid"),
        (
            {"val.retrieval_solution": "/nonexistent.csv", "val.every_steps": 5},
            ValueError,
            "val.retrieval_solution='/nonexistent.csv' does not exist",
        ),
        (
            {"val.retrieval_solution": __file__, "val.every_steps": 0},
            ValueError,
            "scored at the validation steps: set config.val.every_steps > 0",
        ),
        ({"optimizer.schedule_steps": 0}, ValueError, "optimizer.schedule_steps=0"),
        ({"input.cutout.prob": 2.0}, ValueError, "config.input.cutout.prob=2.0"),
    ],
)
def test_bad_configs_fail_before_compiling(demo, tmp_path, overrides, error, match):
    with pytest.raises(error, match=match):
        trainer.train_and_evaluate(config_for(demo["full"], **overrides), str(tmp_path))
    assert not os.path.exists(tmp_path / "checkpoints")


@pytest.mark.parametrize("schedule_steps", [None, 1600])
def test_warmup_cosine_runs_over_schedule_steps(schedule_steps):
    config = load_config("demo")
    config.optimizer.schedule_steps = schedule_steps
    _, schedule = train_steps.build_optimizer(config.optimizer, 1000)
    lr, warmup = config.optimizer.learning_rate, config.optimizer.warmup_steps
    length = schedule_steps or 1000
    for step in (0, 10, warmup, 400, 999, 1000):
        if step < warmup:
            want = lr * step / warmup
        else:
            want = lr * 0.5 * (1 + np.cos(np.pi * (step - warmup) / (length - warmup)))
        assert float(schedule(step)) == pytest.approx(want, rel=1e-5, abs=1e-9), step


@pytest.mark.e2e
def test_empty_data_folder_is_an_error(tmp_path):
    with pytest.raises(data_format.DataFormatError, match="no such folder"):
        trainer.train_and_evaluate(config_for(str(tmp_path / "nothing")), str(tmp_path / "w"))


@pytest.mark.e2e
def test_checkpoints_hold_the_class_sharded_head_on_8_devices(demo, tmp_path):
    trainer.train_and_evaluate(config_for(demo["full"], total_steps=1), str(tmp_path))
    directory = os.path.join(tmp_path, "checkpoints")
    with ocp.CheckpointManager(directory, item_handlers=ocp.StandardCheckpointHandler()) as m:
        tree = m.item_metadata(m.latest_step()).tree
    kernel = tree["params"]["head"]["kernel"]
    assert kernel.shape[1] % 8 == 0
    assert "data" in str(kernel.sharding)


RECIPE_STAGES = {
    "glr2020_retrieval": ["clean", "full", "full640", "full736", "notclean"],
    "glr2021_dolg": ["step1", "step2", "step3"],
    "dolg_paper": ["r50", "r101"],
}


@pytest.mark.parametrize("name", sorted(RECIPE_STAGES))
def test_recipe_configs_validate(demo, name):
    from landmark_jax import config_lib

    for stage in RECIPE_STAGES[name]:
        for arg in (stage, f"{stage},smoke"):
            config = load_config(name, arg)
            config.data_dir = demo["full"]
            config_lib.validate_config(config, num_devices=8)
    with pytest.raises(ValueError, match="valid: one of"):
        load_config(name, "nonsense")


def test_recipe_configs_follow_the_released_code():
    """Details of the released code a summary would miss (see the docstrings)."""
    for stage in RECIPE_STAGES["glr2020_retrieval"]:
        c = load_config("glr2020_retrieval", stage)
        # model(images) without training=True; add_variable's glorot default.
        assert (c.model.batch_norm, c.model.drop_connect_rate, c.head.init) == (
            "frozen",
            0.0,
            "glorot_uniform",
        )
        assert (c.head.margin_type, c.head.scale, c.optimizer.weight_decay) == (
            "none",
            "adacos_dynamic",
            0.0,
        )
    assert load_config("glr2020_retrieval", "clean").loss.class_weights == "inv_log"
    for step in RECIPE_STAGES["glr2021_dolg"]:
        c = load_config("glr2021_dolg", step)
        assert (c.model.batch_norm, c.model.drop_connect_rate, c.head.init) == (
            "batch",
            0.0,
            "uniform_fan_in",
        )
    decay = {s: load_config("glr2021_dolg", s).optimizer.weight_decay for s in ("step1", "step3")}
    assert decay == {"step1": 1e-4, "step3": 0.0}
    # Step 2: a 40-epoch schedule stopped after epoch 29.
    step2 = load_config("glr2021_dolg", "step2")
    assert step2.optimizer.schedule_steps * 29 / 40 == pytest.approx(step2.total_steps, abs=1)
    assert load_config("glr2021_dolg", "step1").optimizer.schedule_steps is None


@pytest.mark.e2e
def test_glr2021_recipe_smoke_trains_and_evaluates(demo, tmp_path):
    """DOLG + sub-center ArcFace + dynamic margins + Adam through the trainer,
    then the recipe's own evaluation: retrieval and kNN recognition (GAP)."""
    from landmark_jax.retrieval import evaluation

    config = load_config("glr2021_dolg", "step1,smoke")
    config.data_dir = demo["full"]
    config.total_steps = 2
    last = trainer.train_and_evaluate(config, str(tmp_path))
    assert np.isfinite(last["loss"]) and last["scale"] == 45.0
    config.eval.retrieval_solution = f"{demo['raw']}/retrieval_solution.csv"
    config.eval.recognition_solution = f"{demo['raw']}/recognition_solution.csv"
    config.eval.knn_backend = "exact"
    metrics = evaluation.evaluate(config, str(tmp_path))
    assert 0.0 <= metrics["map@100"] <= 1.0 and 0.0 <= metrics["gap"] <= 1.0
