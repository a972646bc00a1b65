"""config_lib: the shared defaults, the config arg parser and validation (fast, no training)."""

import pytest

from landmark_jax import config_lib
from landmark_jax.retrieval import eval_config
from landmark_jax.workdir import checkpoint_fit


def _resolves(config, key: str) -> bool:
    node = config
    for part in key.split("."):
        if part not in node:
            return False
        node = node[part]
    return True


@pytest.mark.parametrize("model_name", ["global", "dolg"])
def test_shape_hints_name_keys_of_the_base_config(model_name):
    config = config_lib.base_config(model_name)
    keys = [key for _, hint_keys, _ in checkpoint_fit._SHAPE_HINTS for key in hint_keys]
    assert keys
    assert [key for key in keys if not _resolves(config, key)] == []


def test_shape_hint_text_names_the_keys():
    hint = checkpoint_fit._hint("params/head/kernel")
    assert hint.startswith("num_classes, head.num_subcenters, model.embedding_dim")
    assert "init.carry='model'" in hint
    assert checkpoint_fit._hint("params/model/backbone/stem/kernel") == "model.backbone"
    assert checkpoint_fit._hint("opt_state/x") == "the model config"


def test_parse_config_arg():
    parse = config_lib.parse_config_arg
    assert parse(None, ("a", "b"), "a", "c.py") == ("a", False)
    assert parse("b,smoke", ("a", "b"), "a", "c.py") == ("b", True)
    assert parse("smoke", (), None, "c.py") == (None, True)
    assert parse("", (), None, "c.py") == (None, False)
    for bad in ("c", "a,x", "a,smoke,smoke", ",smoke"):
        with pytest.raises(ValueError, match=r"c\.py: arg .*valid: one of \['a', 'b'\]"):
            parse(bad, ("a", "b"), "a", "c.py")
    with pytest.raises(ValueError, match="valid: 'smoke' or none"):
        parse("a", (), None, "c.py")


def test_default_eval_config_is_valid():
    eval_config.validate_eval_config(config_lib.base_config())
    eval_config.validate_eval_config(config_lib.base_config("dolg"))


@pytest.mark.parametrize(
    ("key", "value", "match"),
    [
        (
            "knn_backend",
            "faiss",
            r"config\.eval\.knn_backend='faiss'; valid: \['scann', 'exact', 'approx_max_k'\]",
        ),
        ("k", 0, r"config\.eval\.k=0: expected an integer >= 1"),
        ("recognition_k", 0, r"config\.eval\.recognition_k=0"),
        ("non_landmark_k", 0, r"config\.eval\.non_landmark_k=0"),
        ("recall_queries", -1, r"config\.eval\.recall_queries=-1"),
        ("size_multiple", 0, r"config\.eval\.size_multiple=0"),
        ("classifier_top_m", 0, r"config\.eval\.classifier_top_m=0"),
        ("recognition_power", -1.0, r"config\.eval\.recognition_power=-1\.0"),
        ("scales", (), r"config\.eval\.scales=\(\).*positive"),
        ("scales", (1.0, 0.0), r"config\.eval\.scales=.*positive"),
        ("resize", "crop", r"config\.eval\.resize='crop'; valid: \['square', 'longer_side'"),
        ("revisited_resize", "crop", r"config\.eval\.revisited_resize='crop'; valid:"),
        ("index_split", "", r"index_split='' skips .*set config\.eval\.revisited_data_dir"),
        ("test_split", "", r"config\.eval\.test_split is empty"),
        ("retrieval_solution", "/nonexistent/sol.csv", r"config\.eval\.retrieval_solution="),
        ("recognition_solution", "/nonexistent/s.csv", r"config\.eval\.recognition_solution="),
        ("revisited_data_dir", "/nonexistent/roxford", r"config\.eval\.revisited_data_dir="),
    ],
)
def test_bad_eval_values_name_the_key(key, value, match):
    config = config_lib.base_config()
    config.eval[key] = value
    with pytest.raises(ValueError, match=match):
        eval_config.validate_eval_config(config)


def test_eval_image_size_and_existing_paths(tmp_path):
    config = config_lib.base_config()
    config.eval.image_size = 0
    with pytest.raises(ValueError, match=r"config\.eval\.image_size=0"):
        eval_config.validate_eval_config(config)
    config.eval.image_size = 64
    solution = tmp_path / "retrieval_solution.csv"
    solution.write_text("id,images,Usage\n")
    config.eval.retrieval_solution = str(solution)
    config.eval.revisited_data_dir = str(tmp_path)
    eval_config.validate_eval_config(config)
    # Recognition off (no train split): its solution is not read, not checked.
    config.eval.recognition_solution = "/nonexistent/s.csv"
    config.eval.train_split = ""
    eval_config.validate_eval_config(config)


def test_eval_ensemble_reuses_the_ensemble_validator():
    config = config_lib.base_config()
    config.eval.ensemble = ({"workdir": "runs/a", "weight": 1.0, "image_size": 640},)
    eval_config.validate_eval_config(config)
    config.eval.ensemble = ({"workdir": "runs/a", "wieght": 1.0},)
    with pytest.raises(ValueError, match=r"config\.eval\.ensemble: ensemble member 0: unknown key"):
        eval_config.validate_eval_config(config)
    config.eval.ensemble = ({"workdir": "runs/a", "weight": -1.0},)
    with pytest.raises(ValueError, match=r"config\.eval\.ensemble: .*weight"):
        eval_config.validate_eval_config(config)


def test_training_validation_keys_live_in_the_val_block():
    config = config_lib.base_config()
    assert "eval_every_steps" not in config and "eval_batch_size" not in config
    assert (config.val.every_steps, config.val.split, config.val.batch_size) == (0, "val", None)
    config.data_dir = "data"
    config.val.every_steps = -1
    with pytest.raises(ValueError, match=r"config\.val\.every_steps=-1: expected >= 0"):
        config_lib.validate_config(config, num_devices=8)
    config.val.every_steps = 10
    config.val.batch_size = 12
    with pytest.raises(ValueError, match=r"config\.val\.batch_size=12 must be a positive multiple"):
        config_lib.validate_config(config, num_devices=8)
