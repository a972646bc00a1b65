"""Weighted cross-entropy, per-class loss weights and per-class dynamic margins.

Per-class quantities (`class_weights`, `weight_normalizer`, `dynamic_margins`,
gathered by `per_class_constants`) are computed once in numpy from the
per-class counts of the data set's `class_counts` metadata
(data_format.read_label_map; indexed by contiguous label, so they cannot be
misaligned) and passed into the jitted step as arrays. Per-batch
quantities (`sample_weights`, `weighted_cross_entropy`, `accuracy`) are jnp and
run under jit, also when the class axis of the logits is sharded across
devices.

GLR2020 1st place (exact):
  clean stage:  w_c = S / ln(n_c),       S = 1 / mean_i(1 / ln n_{y_i})
  full stage:   w_c = S / ln(n_c + 1),   S = 1 / mean_i(f_i / ln(n_{y_i} + 1)),
                f_i = 1 for clean samples, not_clean_weight (1.0, then 0.5) else;
  loss = sum_i f_i w_{y_i} ce_i / global_batch_size.
GLR2021 1st place: m_c = a * minmax(n_c^-1/4) + b (a=0.45, b=0.05).

Which images n_c and S count: the whole CSV, held-out fold included. The
released notebooks (github seungkee/google_landmark_retrieval_2020_1st_place_
solution) read the 16-fold CSV and count every row, although training reads
only the `*_tfrecord_train` shards and validation the `*_tfrecord_valid` ones.
`v2clean_train.ipynb`, cell 3:

    train_16fold = pd.read_csv('.../train_16fold.csv')
    landmarkIdCounter = dict(Counter(train_16fold['clean_landmark_id']))
    train_16fold['counts'] = [landmarkIdCounter[x] for x in train_16fold['clean_landmark_id']]
    scaleV = 1/ np.mean(1/np.log(np.array(train_16fold['counts'])))
    lossWeight = tf.constant(scaleV/np.log(np.array(countIdList)))

`v2total_train.ipynb` cell 3 does the same over `train_total_16fold.csv`, with
`isClean` of every row in the mean (NOT_CLEAN_WEIGHT * 1/np.log(counts+1)).
So both n_c and the mean of S run over every image of the data set, train and
held-out alike. Henkel's GLR2021 margins likewise use `value_counts()` of the
whole train dataframe. Here that is the class_counts metadata's train_val_count and
train_val_clean (train + val split = every image the builder wrote); its
`count` (train split only) is not used for the loss: with a per-class val
split a 2-image GLDv2-clean class can keep one training image, and ln 1 = 0.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from landmark_jax.data import data_format

ArrayLike = np.ndarray | list[int] | tuple[int, ...]


def _counts_array(counts: ArrayLike, name: str = "counts") -> np.ndarray:
    """Validates per-class counts: 1-D, integer-valued, every class >= 1."""
    arr = np.asarray(counts)
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-D array, got shape {arr.shape}")
    if arr.min() < 1:
        bad = int(np.argmin(arr))
        raise ValueError(f"{name}[{bad}] = {arr[bad]}; every class needs >= 1 training example")
    return arr.astype(np.float64)


def _no_weight(counts: np.ndarray) -> np.ndarray:
    return np.ones_like(counts)


def _inv_log(counts: np.ndarray) -> np.ndarray:
    singletons = np.flatnonzero(counts == 1)
    if singletons.size:
        raise ValueError(
            f"class_weights mode 'inv_log' divides by ln(n_c) = 0 for the "
            f"{singletons.size} class(es) with a single example, e.g. label "
            f"{int(singletons[0])}; use mode 'inv_log1p' (1 / ln(n_c + 1))"
        )
    return 1.0 / np.log(counts)


def _inv_log1p(counts: np.ndarray) -> np.ndarray:
    return 1.0 / np.log1p(counts)


_CLASS_WEIGHT_FNS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "none": _no_weight,
    "inv_log": _inv_log,
    "inv_log1p": _inv_log1p,
}
CLASS_WEIGHT_MODES = tuple(_CLASS_WEIGHT_FNS)


def class_weights(counts: ArrayLike, mode: str) -> np.ndarray:
    """Unnormalised per-class loss weights.

    Args:
      counts: [C] examples per class (label order), each >= 1.
      mode: 'none' (all ones), 'inv_log' (1 / ln n_c, GLR2020 clean stage) or
        'inv_log1p' (1 / ln(n_c + 1), GLR2020 full-set stage).

    Returns:
      [C] float64 weights; scale them with `weight_normalizer`.

    Raises:
      ValueError: unknown mode (lists CLASS_WEIGHT_MODES); a count below 1;
        'inv_log' with a class of a single example (ln 1 = 0; the message
        names the label and suggests 'inv_log1p'). No weight is ever clamped.
    """
    if mode not in _CLASS_WEIGHT_FNS:
        raise ValueError(
            f"unknown class weight mode {mode!r}; valid: {', '.join(CLASS_WEIGHT_MODES)}"
        )
    return _CLASS_WEIGHT_FNS[mode](_counts_array(counts))


def weight_normalizer(
    counts: ArrayLike,
    clean_counts: ArrayLike | None,
    class_w: np.ndarray,
    not_clean_weight: float,
) -> float:
    """S such that the mean sample weight over the counted samples is exactly 1.

    S = 1 / mean_i(f_i * w_{y_i}) = sum_c n_c / sum_c w_c (k_c + r (n_c - k_c)),
    with k_c the clean examples of class c, r = not_clean_weight and f_i = 1
    for clean samples, r otherwise. Exact from the counts: no pass over samples.

    Args:
      counts: [C] examples per class (the trainer passes train + val, see the
        module docstring).
      clean_counts: [C] of which clean; None: all clean.
      class_w: [C] unnormalised weights from `class_weights`.
      not_clean_weight: r >= 0, the factor of a not-clean sample.

    Returns:
      S as a Python float; multiply class_w by it.

    Raises:
      ValueError: mismatched shapes, clean counts outside [0, n_c], a negative
        not_clean_weight, or a zero total weight (e.g. r = 0 with no clean
        example).
    """
    n = _counts_array(counts)
    clean = n if clean_counts is None else np.asarray(clean_counts, np.float64)
    w = np.asarray(class_w, np.float64)
    if clean.shape != n.shape or w.shape != n.shape:
        raise ValueError(
            f"counts {n.shape}, clean_counts {clean.shape} and class_w {w.shape} "
            "must have the same shape"
        )
    if np.any(clean < 0) or np.any(clean > n):
        bad = int(np.flatnonzero((clean < 0) | (clean > n))[0])
        raise ValueError(f"clean_counts[{bad}] = {clean[bad]:g} is outside [0, {n[bad]:g}]")
    if not_clean_weight < 0:
        raise ValueError(f"not_clean_weight must be >= 0, got {not_clean_weight}")
    total = float(np.sum(w * (clean + not_clean_weight * (n - clean))))
    if not total > 0:
        raise ValueError("the total sample weight is 0; no sample would contribute to the loss")
    return float(np.sum(n)) / total


def sample_weights(
    labels: jax.Array,
    is_clean: jax.Array,
    class_w_scaled: jax.Array,
    not_clean_weight: float | jax.Array,
) -> jax.Array:
    """Per-sample loss weights: w_{y_i} * (1 if clean else not_clean_weight).

    Args:
      labels: [B] int labels.
      is_clean: [B] bool or 0/1.
      class_w_scaled: [C] class weights already multiplied by S (pass it as a
        jit argument rather than closing over it: a 203k-entry constant would
        be baked into the program).
      not_clean_weight: factor for not-clean samples.

    Returns:
      [B] float32 weights.
    """
    w = jnp.asarray(class_w_scaled, jnp.float32)[labels]
    factor = jnp.where(is_clean.astype(bool), 1.0, jnp.asarray(not_clean_weight, jnp.float32))
    return w * factor


def dynamic_margins(counts: ArrayLike, a: float = 0.45, b: float = 0.05) -> np.ndarray:
    """Per-class ArcFace margins m_c = a * minmax(n_c^-1/4) + b (GLR2021).

    The rarest class gets a + b, the most frequent b. When all counts are
    equal minmax is 0/0; every class then gets b (the margin of the most
    frequent class, which all of them are).

    Args:
      counts: [C] examples per class (label order), each >= 1.
      a: margin range.
      b: smallest margin.

    Returns:
      [C] float64 margins in [b, a + b], indexed by label.

    Raises:
      ValueError: a count below 1.
    """
    tmp = _counts_array(counts) ** -0.25
    lo, hi = tmp.min(), tmp.max()
    if hi == lo:
        return np.full_like(tmp, b)
    return (tmp - lo) / (hi - lo) * a + b


def per_class_constants(
    label_map: data_format.LabelMap,
    *,
    class_weight_mode: str,
    not_clean_weight: float,
    margin_a: float,
    margin_b: float,
) -> dict[str, np.ndarray]:
    """The per-class arrays the train and eval steps index by label.

    The one place that decides which counts the loss uses: the class's images
    over train + val (`label_map.train_val_counts` / `train_val_clean_counts`,
    every row of the builder's CSV), as the GLR2020 notebooks count n_c and
    average S and as the GLR2021 margins count (module docstring).

    Args:
      label_map: from `data_format.read_label_map`.
      class_weight_mode: config.loss.class_weights ('none', 'inv_log',
        'inv_log1p').
      not_clean_weight: config.loss.not_clean_weight, the factor of a
        not-clean sample (inside S too).
      margin_a: config.head.margin_a, the range of the dynamic margins.
      margin_b: config.head.margin_b, the smallest dynamic margin.

    Returns:
      {'class_weights': [C] float32 S * w_c, 'margins': [C] float32 m_c}.
      The margins are always computed; the head uses them only with
      config.head.dynamic_margins.

    Raises:
      ValueError: as `class_weights`, `weight_normalizer` and
        `dynamic_margins`; the message says the counts are the class_counts metadata's
        train_val_count (so a class of one image in the whole data set is
        named as such).
    """
    counts = label_map.train_val_counts
    try:
        class_w = class_weights(counts, class_weight_mode)
        class_w = class_w * weight_normalizer(
            counts, label_map.train_val_clean_counts, class_w, not_clean_weight
        )
        margins = dynamic_margins(counts, margin_a, margin_b)
    except ValueError as e:
        raise ValueError(
            f"per-class constants from the data set's class_counts train_val_count "
            f"(the class's images over train + val): {e}"
        ) from e
    return {
        "class_weights": class_w.astype(np.float32),
        "margins": margins.astype(np.float32),
    }


def _valid_rows(num_rows: int, valid_mask: jax.Array | None) -> jax.Array:
    return jnp.ones((num_rows,), bool) if valid_mask is None else valid_mask.astype(bool)


def weighted_cross_entropy(
    logits: jax.Array,
    labels: jax.Array,
    weights: jax.Array | None = None,
    *,
    valid_mask: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Softmax cross-entropy with per-sample weights, averaged over the batch.

    loss = sum_i v_i w_i ce_i / sum_i v_i (v: valid_mask), i.e. the GLR2020
    `compute_average_loss(global_batch_size)` convention with padded rows
    removed from both sums. Computed in float32 with reductions over the class
    axis only (logsumexp and a masked sum), so a class-sharded [B, C] logits
    array is reduced in place under jit and never gathered.

    Args:
      logits: [B, C] logits (padded classes carrying very negative values).
      labels: [B] int targets.
      weights: [B] per-sample weights; None: all 1.
      valid_mask: [B] bool, False for padded rows; None: all valid.

    Returns:
      (loss, per_example): the scalar float32 loss and the [B] float32
      weighted per-example losses w_i * ce_i (0 for invalid rows), so that
      loss = sum(per_example) / num_valid.
    """
    logits = logits.astype(jnp.float32)
    onehot = labels[:, None] == jnp.arange(logits.shape[-1])[None, :]
    target = jnp.sum(jnp.where(onehot, logits, 0.0), axis=-1)
    ce = jax.nn.logsumexp(logits, axis=-1) - target
    valid = _valid_rows(logits.shape[0], valid_mask)
    w = jnp.ones_like(ce) if weights is None else weights.astype(jnp.float32)
    per_example = jnp.where(valid, w * ce, 0.0)
    num_valid = jnp.maximum(jnp.sum(valid.astype(jnp.float32)), 1.0)
    return jnp.sum(per_example) / num_valid, per_example


def accuracy(
    logits: jax.Array, labels: jax.Array, valid_mask: jax.Array | None = None
) -> jax.Array:
    """Top-1 accuracy over the valid rows.

    Args:
      logits: [B, C] logits or cosines (padded classes never win).
      labels: [B] int targets.
      valid_mask: [B] bool, False for padded rows; None: all valid.

    Returns:
      Scalar float32 fraction of valid rows whose argmax is the label (0 when
      no row is valid).
    """
    valid = _valid_rows(logits.shape[0], valid_mask)
    correct = (jnp.argmax(logits, axis=-1) == labels) & valid
    return jnp.sum(correct.astype(jnp.float32)) / jnp.maximum(
        jnp.sum(valid.astype(jnp.float32)), 1.0
    )
