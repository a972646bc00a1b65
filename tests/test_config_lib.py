"""config_lib: the shared defaults, the config arg parser and validation (fast, no training)."""

import pytest

from landmark_jax import checkpointing, config_lib


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
    keys = [key for _, hint_keys, _ in checkpointing._SHAPE_HINTS for key in hint_keys]
    assert keys
    assert [key for key in keys if not _resolves(config, key)] == []


def test_shape_hint_text_names_the_keys():
    hint = checkpointing._hint("params/head/kernel")
    assert hint.startswith("num_classes, head.num_subcenters, model.embedding_dim")
    assert "init.carry='model'" in hint
    assert checkpointing._hint("params/model/backbone/stem/kernel") == "model.backbone"
    assert checkpointing._hint("opt_state/x") == "the model config"


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
