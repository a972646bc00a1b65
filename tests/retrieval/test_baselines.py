"""Retrieval baselines: chance in closed form against the metric code on
random rankings, and raw pixels against numpy."""

import numpy as np
import pytest
from configs_for_tests import load_config

from landmark_jax.data import input_pipeline
from landmark_jax.retrieval import baselines, extract, metrics


def test_chance_of_one_relevant_among_two_is_three_quarters():
    # Rank 1 with probability 1/2 (AP 1), rank 2 otherwise (AP 1/2).
    assert baselines.chance_map({"q": ["a"]}, ["a", "b"]) == pytest.approx(0.75)


def test_chance_equals_the_metric_on_random_rankings():
    rng = np.random.default_rng(0)
    index = [f"i{j}" for j in range(9)]
    solution = {
        "q1": ["i0", "i1"],
        "q2": ["i2", "i3", "i4", "i5"],
        "q3": ["i6", "missing"],  # a relevant image outside the index still counts in m
        "q4": [],  # scores 0 and counts
    }
    # (the metric's cutoff, ids ranked per query): eval.k may rank fewer.
    for cutoff, ranked in ((3, 3), (100, 100), (100, 4)):
        want = baselines.chance_map(solution, index, cutoff, num_predictions=ranked)
        draws = [
            metrics.mean_average_precision(
                {q: list(rng.permutation(index))[:ranked] for q in solution},
                solution,
                max_predictions=cutoff,
            )
            for _ in range(6000)
        ]
        tolerance = 3 * np.std(draws) / np.sqrt(6000)
        assert np.mean(draws) == pytest.approx(want, abs=tolerance), (cutoff, ranked)


def test_raw_pixels_are_the_centred_unit_pixel_vectors(demo):
    config = load_config("demo", "smoke")
    emb = extract.extract(
        baselines.raw_pixel_model(config), "index", data_dir=demo["full"], image_size=16
    )
    dataset, _ = input_pipeline.create_eval_dataset(
        demo["full"], "index", image_size=16, local_batch_size=8
    )
    want = {}
    for batch in dataset.as_numpy_iterator():
        for image_id, image, real in zip(batch["id"], batch["image"], batch["mask"], strict=True):
            if real:
                x = image.astype(np.float64).ravel()
                x -= x.mean()
                want[image_id.decode()] = x / np.linalg.norm(x)
    assert sorted(emb.ids) == sorted(want)
    for image_id, row in zip(emb.ids, emb.embeddings, strict=True):
        np.testing.assert_allclose(row, want[image_id], atol=1e-5)
