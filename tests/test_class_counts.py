"""Class counts over train + val: the GLR2020 clean stage on GLDv2-clean-shaped data.

GLDv2-clean has many classes of exactly 2 images. The builder's per-class val
split can leave such a class with 1 training image; the reference counts n_c
over the whole CSV (train + held-out), so n_c stays 2 and w_c = S / ln n_c is
finite. This builds such a data set and trains the clean stage on it with
'inv_log', as the documented recipe does, then evaluates it.
"""

import json
import os

import flax
import numpy as np
import pytest
from configs_for_tests import load_config

from data_pipelines import build_dataset
from landmark_jax import trainer
from landmark_jax.data import data_format
from landmark_jax.retrieval import evaluation
from landmark_jax.training import losses
from landmark_jax.workdir import checkpointing

import tiny_gldv2

pytestmark = pytest.mark.e2e


def test_glr2020_clean_stage_trains_with_two_image_classes(demo, tmp_path):
    raw = str(tmp_path / "raw")
    # 40 classes of 2 clean images each and nothing else, like the small end of
    # GLDv2-clean.
    tiny_gldv2.make_tiny_gldv2(
        raw, num_landmarks=40, images_per_landmark=2, noisy_per_landmark=0, num_index=1, num_test=1
    )
    # f = 0.3: a 2-image class gives floor(0.6 + u) = 1 image to val with
    # probability 0.6, leaving it 1 training image.
    builder, _ = build_dataset.build(
        "gldv2/clean",
        str(tmp_path / "tfds"),
        manual_dir=raw,
        num_shards=2,
        val_fraction=0.3,
        num_workers=1,
    )
    data_dir = str(builder.data_dir)
    label_map = data_format.read_label_map(data_dir)
    singles = int(np.sum(label_map.counts == 1))
    assert singles >= 10, f"only {singles} class(es) left with 1 training image"
    np.testing.assert_array_equal(label_map.train_val_counts, np.full(40, 2))
    # The train-split counts alone would put ln 1 = 0 in the weights.
    with pytest.raises(ValueError, match="divides by ln"):
        losses.class_weights(label_map.counts, "inv_log")

    config = load_config("glr2020_retrieval", "clean,smoke")
    assert config.loss.class_weights == "inv_log"  # the recipe's clean stage, smoke too
    config.data_dir = data_dir
    config.total_steps = 2
    config.log_every_steps = 2
    config.checkpoint_every_steps = 2
    config.val.every_steps = 0
    workdir = str(tmp_path / "run")
    last = trainer.train_and_evaluate(config, workdir)

    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    assert [r["step"] for r in rows if "loss" in r] == [2]
    assert all(np.isfinite(r["loss"]) for r in rows if "loss" in r)
    assert np.isfinite(last["loss"])

    # As released, the GLR2020 backbone trains in inference mode: after two
    # SGD steps every BatchNorm still holds its initial moving statistics
    # (mean 0, variance 1 from scratch) while its gamma/beta have moved.
    stage = checkpointing.load_stage(workdir)
    stats = flax.traverse_util.flatten_dict(stage["batch_stats"]["model"], sep="/")
    assert stats and all(np.all(v == (1.0 if k.endswith("var") else 0.0)) for k, v in stats.items())
    params = flax.traverse_util.flatten_dict(stage["params"]["model"], sep="/")
    gammas = [v for k, v in params.items() if k.endswith("bn/scale")]
    assert gammas and any(np.any(g != 1.0) for g in gammas)
    # Its head starts from Keras's glorot_uniform, bound sqrt(6 / (D + C)) with
    # the real C; the padded columns get no gradient and keep their init.
    kernel = stage["params"]["head"]["kernel"]
    bound = np.sqrt(6.0 / (kernel.shape[0] + 40))
    assert bound * 0.95 < np.abs(kernel[:, 40:]).max() <= bound

    # And its own evaluation (the recipe's eval settings, smoke sizes) on a
    # data folder with index and test splits, retrieval only.
    eval_config = load_config("glr2020_retrieval", "clean,smoke")
    eval_config.data_dir = demo["full"]
    eval_config.eval.retrieval_solution = f"{demo['raw']}/retrieval_solution.csv"
    eval_config.eval.train_split = ""
    eval_config.eval.knn_backend = "exact"
    metrics = evaluation.evaluate(eval_config, workdir)
    assert 0.0 <= metrics["map@100"] <= 1.0 and "gap" not in metrics
