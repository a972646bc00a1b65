"""Class weights, weight normaliser, dynamic margins and weighted CE, against numpy."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from landmark_jax.data import data_format
from landmark_jax.training import heads, losses

# Jitted: run eagerly, each jnp op inside compiles a program of its own per
# shape (about 30 for a cross-entropy); jitted, one per call signature.
_sample_weights = jax.jit(losses.sample_weights)
_weighted_cross_entropy = jax.jit(losses.weighted_cross_entropy)
_accuracy = jax.jit(losses.accuracy)

COUNTS = np.array([2, 5, 1, 40, 7, 3])
CLEAN = np.array([2, 3, 0, 25, 7, 1])


def test_class_weights_each_mode():
    np.testing.assert_array_equal(losses.class_weights(COUNTS, "none"), np.ones(6))
    np.testing.assert_allclose(losses.class_weights(COUNTS, "inv_log1p"), 1 / np.log(COUNTS + 1))
    no_singletons = COUNTS + 1
    got = losses.class_weights(no_singletons, "inv_log")
    assert got.dtype == np.float64
    np.testing.assert_allclose(got, 1 / np.log(no_singletons))


def test_class_weights_guards():
    with pytest.raises(ValueError, match=r"label 2.*inv_log1p"):
        losses.class_weights(COUNTS, "inv_log")
    with pytest.raises(ValueError, match=r"counts\[1\] = 0"):
        losses.class_weights([3, 0, 4], "inv_log1p")
    with pytest.raises(ValueError, match="none, inv_log, inv_log1p"):
        losses.class_weights(COUNTS, "inverse")


@pytest.mark.parametrize("not_clean_weight", [1.0, 0.5])
@pytest.mark.parametrize("mode", ["none", "inv_log1p"])
def test_normalizer_gives_unit_mean_sample_weight(mode, not_clean_weight):
    # The training set, one row per sample, as the GLR2020 notebook sees it.
    labels = np.repeat(np.arange(len(COUNTS)), COUNTS)
    is_clean = np.concatenate([np.arange(n) < k for n, k in zip(COUNTS, CLEAN, strict=True)])
    class_w = losses.class_weights(COUNTS, mode)
    s = losses.weight_normalizer(COUNTS, CLEAN, class_w, not_clean_weight)

    factor = np.where(is_clean, 1.0, not_clean_weight)
    assert s == pytest.approx(1 / np.mean(factor * class_w[labels]), rel=1e-12)
    w = _sample_weights(labels, is_clean, (class_w * s).astype(np.float32), not_clean_weight)
    assert w.dtype == jnp.float32
    np.testing.assert_allclose(w, factor * class_w[labels] * s, rtol=1e-6)
    assert float(np.mean(np.asarray(w, np.float64))) == pytest.approx(1.0, abs=1e-6)


def test_normalizer_clean_stage_and_errors():
    counts = np.array([2, 9, 30])
    class_w = losses.class_weights(counts, "inv_log")
    # All clean (clean_counts=None): S = 1 / mean_i(1 / ln n_{y_i}).
    want = 1 / np.mean(1 / np.log(np.repeat(counts, counts)))
    assert losses.weight_normalizer(counts, None, class_w, 0.5) == pytest.approx(want)
    with pytest.raises(ValueError, match="outside"):
        losses.weight_normalizer(counts, [3, 0, 0], class_w, 1.0)
    with pytest.raises(ValueError, match="same shape"):
        losses.weight_normalizer(counts, [1, 1], class_w, 1.0)
    with pytest.raises(ValueError, match="total sample weight is 0"):
        losses.weight_normalizer(counts, [0, 0, 0], class_w, 0.0)


def test_dynamic_margins():
    counts = np.array([10, 1, 10_000, 500, 1])
    m = losses.dynamic_margins(counts)
    tmp = np.sqrt(1 / np.sqrt(counts))  # the GLR2021 code's spelling of n^-1/4
    np.testing.assert_allclose(m, (tmp - tmp.min()) / (tmp.max() - tmp.min()) * 0.45 + 0.05)
    assert m[1] == m[4] == pytest.approx(0.5)  # rarest
    assert m[2] == pytest.approx(0.05)  # most frequent
    assert np.all((m >= 0.05) & (m <= 0.5 + 1e-12))
    # Hand value: counts 1, 16, 256 -> n^-1/4 = 1, 0.5, 0.25 -> 1, 1/3, 0.
    np.testing.assert_allclose(
        losses.dynamic_margins([1, 16, 256], a=0.3, b=0.1), [0.4, 0.2, 0.1], rtol=1e-12
    )
    np.testing.assert_array_equal(losses.dynamic_margins([7, 7, 7]), [0.05] * 3)


def np_weighted_ce(logits, labels, weights, valid):
    logits = logits.astype(np.float64)
    mx = logits.max(-1, keepdims=True)
    lse = np.log(np.exp(logits - mx).sum(-1)) + mx[:, 0]
    ce = lse - logits[np.arange(len(labels)), labels]
    per = np.where(valid, weights * ce, 0.0)
    return per.sum() / valid.sum(), per


def test_weighted_cross_entropy_matches_numpy():
    rng = np.random.default_rng(0)
    logits = rng.normal(scale=10, size=(6, 9)).astype(np.float32)
    logits[:, 7:] = heads.PADDED_COSINE * 30  # padded classes, as the head makes them
    labels = rng.integers(0, 7, size=6)
    weights = rng.uniform(0.2, 2, size=6).astype(np.float32)
    valid = np.array([1, 1, 0, 1, 1, 0], bool)
    loss, per = _weighted_cross_entropy(logits, labels, weights, valid_mask=valid)
    want_loss, want_per = np_weighted_ce(logits, labels, weights, valid)
    np.testing.assert_allclose(per, want_per, rtol=1e-5)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
    # Unweighted, unmasked: mean CE over all rows.
    loss, _ = _weighted_cross_entropy(logits, labels)
    np.testing.assert_allclose(loss, np_weighted_ce(logits, labels, 1.0, np.ones(6, bool))[0], 1e-5)


def test_weighted_cross_entropy_by_hand():
    # Two equal logits: ce = ln 2 per row; weights 1 and 3 over B=2: 2 ln 2.
    loss, per = _weighted_cross_entropy(
        np.zeros((2, 2), np.float32), np.array([0, 1]), np.array([1.0, 3.0], np.float32)
    )
    np.testing.assert_allclose(per, [math.log(2), 3 * math.log(2)], rtol=1e-6)
    np.testing.assert_allclose(loss, 2 * math.log(2), rtol=1e-6)


def test_accuracy():
    logits = np.array([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4]], np.float32)
    labels = np.array([1, 1, 1, 0])
    assert float(_accuracy(logits, labels)) == pytest.approx(0.75)
    valid = np.array([True, False, True, False])
    assert float(_accuracy(logits, labels, valid)) == pytest.approx(1.0)
    assert float(_accuracy(logits, labels, np.zeros(4, bool))) == 0.0


def _label_map(train, train_clean, train_val, train_val_clean):
    return data_format.LabelMap(
        landmark_ids=np.arange(len(train)) * 10,
        counts=np.array(train),
        clean_counts=np.array(train_clean),
        train_val_counts=np.array(train_val),
        train_val_clean_counts=np.array(train_val_clean),
    )


def test_per_class_constants_use_train_val_counts_clean_stage():
    # Class 0 kept 1 of its 2 images for training: ln 1 = 0 on train counts,
    # but n_0 = 2 over train + val, as the reference counts it.
    label_map = _label_map([1, 3, 4], [1, 3, 4], [2, 3, 5], [2, 3, 5])
    got = losses.per_class_constants(
        label_map, class_weight_mode="inv_log", not_clean_weight=1.0, margin_a=0.45, margin_b=0.05
    )
    assert set(got) == {"class_weights", "margins"}
    assert got["class_weights"].dtype == got["margins"].dtype == np.float32
    # By hand: samples 2 x 1/ln2, 3 x 1/ln3, 5 x 1/ln5 (all clean) ->
    # S = 10 / (2/ln2 + 3/ln3 + 5/ln5).
    s = 10 / (2 / math.log(2) + 3 / math.log(3) + 5 / math.log(5))
    want_w = [s / math.log(2), s / math.log(3), s / math.log(5)]
    np.testing.assert_allclose(got["class_weights"], want_w, rtol=1e-6)
    # Margins: n^-1/4 = 2^-.25, 3^-.25, 5^-.25; rarest (n=2) a + b, largest b.
    t = np.array([2, 3, 5], float) ** -0.25
    want_m = 0.45 * (t - t[2]) / (t[0] - t[2]) + 0.05
    np.testing.assert_allclose(got["margins"], want_m, rtol=1e-6)
    np.testing.assert_allclose(got["margins"][[0, 2]], [0.5, 0.05], rtol=1e-6)


def test_per_class_constants_full_stage_not_clean_factor():
    # Train + val: class 0 has 4 images, 2 clean; class 1 has 1 image, clean.
    label_map = _label_map([3, 1], [1, 1], [4, 1], [2, 1])
    got = losses.per_class_constants(
        label_map, class_weight_mode="inv_log1p", not_clean_weight=0.5, margin_a=0.3, margin_b=0.1
    )
    # Samples: class 0: 2 clean (1/ln5) + 2 not clean (0.5/ln5); class 1:
    # 1 clean (1/ln2). S = 5 / (3/ln5 + 1/ln2).
    s = 5 / (3 / math.log(5) + 1 / math.log(2))
    np.testing.assert_allclose(got["class_weights"], [s / math.log(5), s / math.log(2)], rtol=1e-6)
    np.testing.assert_allclose(got["margins"], [0.1, 0.4], rtol=1e-6)


def test_per_class_constants_errors_name_the_counts():
    label_map = _label_map([1, 3], [1, 3], [1, 4], [1, 4])  # one image in all
    with pytest.raises(ValueError, match=r"train_val_count.*label 0.*inv_log1p"):
        losses.per_class_constants(
            label_map,
            class_weight_mode="inv_log",
            not_clean_weight=1.0,
            margin_a=0.45,
            margin_b=0.05,
        )
    with pytest.raises(ValueError, match="unknown class weight mode 'log'"):
        losses.per_class_constants(
            label_map, class_weight_mode="log", not_clean_weight=1.0, margin_a=0.45, margin_b=0.05
        )
