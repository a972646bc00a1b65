"""configs/dolg_paper.py and configs/glr2020_ensemble.py in smoke mode, end to end."""

import os
import shutil

import numpy as np
import optax
import pytest
from configs_for_tests import load_config

from landmark_jax import trainer
from landmark_jax.retrieval import eval_config, evaluation, extract
from landmark_jax.training import train_steps
from landmark_jax.workdir import run_config


@pytest.mark.e2e
def test_dolg_paper_smoke_trains_and_scores_revisited_only(demo, revisited_data, tmp_path):
    workdir = str(tmp_path / "run")
    config = load_config("dolg_paper", "r50,smoke")
    config.data_dir = demo["full"]
    config.total_steps = 2
    last = trainer.train_and_evaluate(config, workdir)
    assert np.isfinite(last["loss"]) and last["scale"] == 30.0
    saved = run_config.read_run_config(workdir)
    assert tuple(saved.model.dolg.dilations) == () and saved.model.neck == "dense"
    assert saved.optimizer.nesterov is True

    eval_config = load_config("dolg_paper", "r50,smoke")
    eval_config.eval.revisited_data_dir = revisited_data[1]
    # Fewer image shapes to compile: sides rounded to 32 px, and two of the
    # recipe's five scales (every scale a program per shape; the five are
    # checked against the released code's list below).
    eval_config.eval.size_multiple = 32
    eval_config.eval.scales = (0.7071, 1.0)
    metrics = evaluation.evaluate(eval_config, workdir)
    assert set(metrics["revisited"]) == {"easy", "medium", "hard"}
    assert "map@100" not in metrics  # no GLDv2 splits were embedded
    assert not [f for f in os.listdir(os.path.join(workdir, "eval")) if "index" in f]
    eval_config.eval.retrieval_solution = f"{demo['raw']}/retrieval_solution.csv"
    with pytest.raises(ValueError, match="retrieval_solution needs the GLDv2 splits"):
        evaluation.evaluate(eval_config, workdir)


def test_nesterov_sgd_is_pytorch_s():
    """SGD(nesterov=True, momentum m, weight_decay wd) in PyTorch's form:
    g += wd p; v = m v + g; p -= lr (g + m v)."""
    cfg = load_config("dolg_paper", "r50").optimizer
    cfg.schedule = "constant"
    tx, _ = train_steps.build_optimizer(cfg, total_steps=10)
    p = np.array([1.0, -2.0])
    grads = [np.array([0.5, 0.25]), np.array([-1.0, 0.5]), np.array([0.25, 0.0])]
    params, state = p.copy(), tx.init(p)
    v, want = np.zeros(2), p.copy()
    for g in grads:
        updates, state = tx.update(g, state, params)
        params = optax.apply_updates(params, updates)
        g = g + cfg.weight_decay * want
        v = cfg.momentum * v + g
        want = want - cfg.learning_rate * (g + cfg.momentum * v)
    np.testing.assert_allclose(params, want, rtol=1e-6)


# In name order: a ConfigDict sorts its keys, and so the blocks.
MEMBERS = ("b6_640", "b7_512", "b7_640", "b7_640_second")


@pytest.mark.e2e
def test_glr2020_ensemble_smoke_concatenates_the_weighted_members(demo, trained_demo, tmp_path):
    config = load_config("glr2020_ensemble", "released,smoke")
    config.data_dir = demo["full"]
    config.eval.retrieval_solution = f"{demo['raw']}/retrieval_solution.csv"
    # A member without its workdir is named before anything runs.
    with pytest.raises(ValueError, match="ensemble member 'b6_640': .*workdir"):
        eval_config.validate_eval_config(config)
    workdirs = []
    for name in MEMBERS:  # four runs: copies of one, fed at their sizes
        workdirs.append(str(tmp_path / name))
        shutil.copytree(trained_demo, workdirs[-1], ignore=shutil.ignore_patterns("eval"))
        config.eval.ensemble[name].workdir = workdirs[-1]
    out = str(tmp_path / "ensemble")
    metrics = evaluation.evaluate(config, out)
    assert metrics["members"] == workdirs and 0.0 <= metrics["map@100"] <= 1.0
    assert "gap" not in metrics  # retrieval only

    # Each member's cache holds its unit descriptors at its size; the three
    # fed 48 px are one model, so theirs agree, and the 32 px one differs.
    def member_embeddings(split):
        parts = [
            extract.Embeddings.load(os.path.join(out, "eval", f"embeddings-{split}-{i}.npz"))
            for i in range(len(MEMBERS))
        ]
        assert [p.settings["image_size"] for p in parts] == [48, 32, 48, 48]
        for p in parts[1:]:
            np.testing.assert_array_equal(p.ids, parts[0].ids)
        return parts[0].ids, [p.embeddings.astype(np.float64) for p in parts]

    index_ids, index = member_embeddings("index")
    test_ids, test = member_embeddings("test")
    np.testing.assert_allclose(test[0], test[2], atol=1e-6)
    assert np.abs(test[1] - test[0]).max() > 1e-3

    # The submission ranks the index by the weighted concatenation of the
    # normalised descriptors (numpy reference, in member-name order).
    def combined(parts):
        weights = (0.8, 0.5, 1.0, 0.55)
        return np.concatenate(
            [
                w * e / np.linalg.norm(e, axis=1, keepdims=True)
                for w, e in zip(weights, parts, strict=True)
            ],
            axis=1,
        )

    scores = combined(test) @ combined(index).T
    with open(os.path.join(out, "eval", "retrieval_submission.csv")) as f:
        rows = dict(line.strip().split(",") for line in list(f)[1:])
    assert sorted(rows) == sorted(test_ids)
    position = {str(image_id): j for j, image_id in enumerate(index_ids)}
    for query, row in zip(test_ids, scores, strict=True):
        ranked = row[[position[image_id] for image_id in rows[query].split()]]
        assert len(ranked) == min(100, len(index_ids))
        # Best first, up to float32 rounding (the short run's scores are close).
        assert np.all(np.diff(ranked) <= 2e-6), (query, ranked)


def test_glr2020_ensemble_article_variant():
    config = load_config("glr2020_ensemble", "article")
    members = config.eval.ensemble
    assert list(members) == ["b5_a", "b5_b", "b6", "b7"]
    assert [m.weight for m in members.values()] == [0.5, 0.5, 0.8, 1.0]
    assert all(m.image_size is None for m in members.values())
    with pytest.raises(ValueError, match="valid: one of"):
        load_config("glr2020_ensemble", "b5")


def test_dolg_paper_evaluates_at_the_released_five_scales_three_on_request():
    """Default: evaler/infer.py's SCALE_LIST, which the released cropped
    feature files (*_crop_test5) come from; the docstring's flag gives three."""
    from absl import flags
    from configs_for_tests import REPO
    from ml_collections import config_flags

    for arg in ("r50", "r101"):
        config = load_config("dolg_paper", arg)
        assert tuple(config.eval.scales) == (0.3535, 0.5, 0.7071, 1.0, 1.4142)
        assert config.eval.revisited_resize == "native" and config.eval.flip is False
    # The option, as the module docstring spells it on a command line.
    import importlib.util

    spec = importlib.util.spec_from_file_location("dolg_paper", f"{REPO}/configs/dolg_paper.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    option = '--config.eval.scales="(0.7071, 1.0, 1.4142)"'
    assert option in module.__doc__ and "three" in module.SCALES
    # What a shell passes on: the quotes removed.
    argv = ["prog", f"--config={REPO}/configs/dolg_paper.py:r101", option.replace('"', "")]
    values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "", flag_values=values, sys_argv=argv)
    values(argv)
    assert tuple(values.config.eval.scales) == module.SCALES["three"] == (0.7071, 1.0, 1.4142)
