"""Embedding ensembles, GLR2020 style: normalise each model, weight it, concatenate.

The GLR2020 winning export L2-normalised each model's 512-d descriptor,
multiplied it by the model's weight and concatenated the results (4 x 512 =
2048-d), without normalising the concatenation again; the competition then
ranked the index by Euclidean distance on that vector. For parts a_i, b_i of
unit length and weights w_i,

    ||concat(w_i a_i) - concat(w_i b_i)||^2 = sum_i w_i^2 ||a_i - b_i||^2
                                            = sum_i w_i^2 (2 - 2 cos_i),

so the ranking is that of sum_i w_i^2 cos_i: a model's cosine counts with the
square of its weight (0.8 -> 0.64). Because every row has the same norm
sqrt(sum w_i^2), normalising the concatenation would change distances by
one constant factor and no ranking, so it is not done.

Models extracted in separate runs may list the images in different orders;
`align_by_ids` puts them in one order before they are combined. Ensembles are
configured as a list of members (workdir, weight, image size); see
`ensemble_members_from_config`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np

# The released GLR2020 1st-place ensemble (export_model.ipynb), as (member,
# weight, image size it is fed, the released checkpoint's name):
# EfficientNet-B7 at 640 px, B6 at 640 px, a second B7 run (512 px, its
# not-clean stage at 640, fed 640) and a B7 at 512 px; configs/glr2020_ensemble.py evaluates it. The
# summary article's "B7/B6/B5 at 1.0/0.8/0.5" is not what the code exports.
GLR2020_RELEASED: tuple[tuple[str, float, int, str], ...] = (
    ("b7_640", 1.0, 640, "eff7_640_notclean_0.5_1.1411"),
    ("b6_640", 0.8, 640, "eff6_640_notclean_0.5_1.1931"),
    ("b7_640_second", 0.55, 640, "eff7_512_ver2_10293_NotClean_0.5_640 (epoch 44)"),
    ("b7_512", 0.5, 512, "eff7_512_ver1_notclean0.5_1.2580"),
)

_MEMBER_KEYS = ("workdir", "weight", "image_size")


def _check_weight(weight: Any, where: str) -> float:
    if isinstance(weight, bool) or not isinstance(weight, (int, float, np.integer, np.floating)):
        raise ValueError(f"{where}: weight must be a number, got {weight!r}")
    weight = float(weight)
    if not (math.isfinite(weight) and weight > 0):
        raise ValueError(f"{where}: weight must be finite and > 0, got {weight}")
    return weight


def _as_float32(embedding: Any, where: str) -> np.ndarray:
    array = np.asarray(embedding)
    # bfloat16 (ml_dtypes) has kind 'V', so it is named explicitly.
    if array.dtype.kind != "f" and array.dtype.name != "bfloat16":
        raise TypeError(f"{where}: embeddings must be floating point, got dtype {array.dtype}")
    if array.ndim != 2:
        raise ValueError(f"{where}: embeddings must be 2-D [N, D], got shape {array.shape}")
    return array.astype(np.float32, copy=False)


def combine_embeddings(
    embeddings: Sequence[np.ndarray],
    weights: Sequence[float],
) -> np.ndarray:
    """Concatenates the L2-normalised embeddings of several models, each times its weight.

    Rows must already be aligned (same image in the same row of every model;
    see align_by_ids).

    Args:
      embeddings: one [N, D_i] floating array per model; need not be normalised.
      weights: one weight > 0 per model (e.g. 1.0, 0.8, 0.55, 0.5 for GLR2020).

    Returns:
      [N, sum D_i] float32, as the GLR2020 export: every row has norm
      sqrt(sum w_i^2) and squared L2 distances equal
      sum_i w_i^2 ||a_i - b_i||^2 of the normalised parts.

    Raises:
      ValueError: no models, a different number of weights, a weight <= 0 or
        not finite, row counts differ, an array is not 2-D, or a row is zero
        or not finite (it has no direction to normalise).
      TypeError: an array is not floating point.
    """
    if len(embeddings) == 0:
        raise ValueError("combine_embeddings needs at least one model's embeddings")
    if len(weights) != len(embeddings):
        raise ValueError(f"{len(embeddings)} embedding arrays but {len(weights)} weights")
    weights = [_check_weight(w, f"model {i}") for i, w in enumerate(weights)]
    arrays = [_as_float32(e, f"model {i}") for i, e in enumerate(embeddings)]
    num_rows = arrays[0].shape[0]
    for i, array in enumerate(arrays):
        if array.shape[0] != num_rows:
            raise ValueError(
                f"model {i} has {array.shape[0]} embeddings, model 0 has {num_rows}; "
                "every model must embed the same images (align_by_ids puts them in one order)"
            )

    # Written part by part into one buffer: a 762k x 2048 index is 6 GB, so
    # no full-size temporaries.
    out = np.empty((num_rows, sum(a.shape[1] for a in arrays)), dtype=np.float32)
    start = 0
    for i, (array, weight) in enumerate(zip(arrays, weights, strict=True)):
        part = out[:, start : start + array.shape[1]]
        start += array.shape[1]
        norms = np.sqrt(np.einsum("nd,nd->n", array, array))[:, None]
        bad = ~(np.isfinite(norms[:, 0]) & (norms[:, 0] > 0))
        if bad.any():
            rows = np.flatnonzero(bad)[:5].tolist()
            raise ValueError(f"model {i}: row(s) {rows} are zero or not finite")
        np.divide(array, norms, out=part)
        part *= np.float32(weight)
    return out


def align_by_ids(
    members: Sequence[tuple[Sequence[Hashable], np.ndarray]],
) -> tuple[list[Hashable], list[np.ndarray]]:
    """Puts several models' embeddings into the first model's id order.

    Args:
      members: one (ids [N], embeddings [N, D_i]) per model, as written by
        separate extraction runs.

    Returns:
      (the first model's ids as a list, one [N, D_i] array per model with row
      j holding the embedding of ids[j]). Arrays already in that order are
      returned as they are.

    Raises:
      ValueError: no members, ids and rows disagree in number, an id repeats
        within a model, or a model lacks an id of the first model or has one
        the first lacks (the message names up to five).
    """
    if len(members) == 0:
        raise ValueError("align_by_ids needs at least one (ids, embeddings) pair")
    columns = []
    for i, (ids, embeddings) in enumerate(members):
        ids = list(np.asarray(ids, dtype=object).ravel())
        embeddings = np.asarray(embeddings)
        if embeddings.ndim < 1 or embeddings.shape[0] != len(ids):
            raise ValueError(
                f"model {i}: {len(ids)} ids but embeddings of shape {embeddings.shape}"
            )
        if len(set(ids)) != len(ids):
            seen: set[Hashable] = set()
            repeated = [x for x in ids if x in seen or seen.add(x)]
            raise ValueError(f"model {i}: id(s) {repeated[:5]} appear more than once")
        columns.append((ids, embeddings))

    reference_ids = columns[0][0]
    reference_set = set(reference_ids)
    aligned = []
    for i, (ids, embeddings) in enumerate(columns):
        if ids == reference_ids:
            aligned.append(embeddings)
            continue
        row_of = {x: r for r, x in enumerate(ids)}
        missing = [x for x in reference_ids if x not in row_of]
        if missing:
            raise ValueError(f"model {i} lacks {len(missing)} id(s) of model 0, e.g. {missing[:5]}")
        extra = [x for x in ids if x not in reference_set]
        if extra:
            raise ValueError(f"model {i} has {len(extra)} id(s) model 0 lacks, e.g. {extra[:5]}")
        aligned.append(embeddings[np.fromiter((row_of[x] for x in reference_ids), np.int64)])
    return list(reference_ids), aligned


@dataclasses.dataclass(frozen=True)
class EnsembleMember:
    """One model of an ensemble.

    Attributes:
      workdir: the training run's workdir (its checkpoint and config.json).
      weight: the multiplier of the model's normalised embedding, > 0.
      image_size: the input size to extract at; None: the size the model
        was trained at (its config's).
    """

    workdir: str
    weight: float
    image_size: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.workdir, str) or not self.workdir.strip():
            raise ValueError(f"workdir must be a non-empty string, got {self.workdir!r}")
        object.__setattr__(self, "weight", _check_weight(self.weight, self.workdir))
        size = self.image_size
        if size is not None and (
            isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size <= 0
        ):
            raise ValueError(
                f"{self.workdir}: image_size must be a positive integer or None, got {size!r}"
            )
        if size is not None:
            object.__setattr__(self, "image_size", int(size))


def ensemble_members_from_config(config_entries: Sequence[Any]) -> list[EnsembleMember]:
    """Validates an ensemble config: {'workdir', 'weight', 'image_size'} entries,
    as a list or as a dict of named members (a ConfigDict lists its keys
    sorted; the order of the blocks does not change a similarity).

    For example, the GLR2020 release as a config:

        [{'workdir': 'runs/b7_640', 'weight': 1.0, 'image_size': 640},
         {'workdir': 'runs/b6_640', 'weight': 0.8, 'image_size': 640},
         {'workdir': 'runs/b7_512_v2', 'weight': 0.55, 'image_size': 640},
         {'workdir': 'runs/b7_512', 'weight': 0.5, 'image_size': 512}]

    The same workdir may appear at two image sizes (multi-resolution), not
    twice at the same size.

    Args:
      config_entries: a sequence of mappings (dicts or ConfigDicts), or a
        mapping of member names to them; 'workdir' and 'weight' are
        required, 'image_size' is optional.

    Returns:
      One EnsembleMember per entry, in order.

    Raises:
      ValueError: the list is empty or not a list, an entry is not a mapping,
        lacks a required key or has an unknown one (a typo would otherwise be
        ignored), a value is invalid, or a (workdir, image_size) repeats. The
        message names the entry's position (or name).
    """
    if hasattr(config_entries, "to_dict") and not isinstance(config_entries, Mapping):
        config_entries = config_entries.to_dict()  # a ConfigDict of named members
    if isinstance(config_entries, Mapping):
        # Named members (configs/glr2020_ensemble.py): a command line sets one
        # member's key, e.g. --config.eval.ensemble.b7_640.workdir=gs://...
        named = [(f"ensemble member {name!r}", e) for name, e in config_entries.items()]
    elif isinstance(config_entries, (str, bytes)) or not isinstance(config_entries, Sequence):
        raise ValueError(
            "an ensemble config is a list of member dicts or a dict of named ones, got "
            f"{type(config_entries).__name__}"
        )
    else:
        named = [(f"ensemble member {i}", e) for i, e in enumerate(config_entries)]
    if len(named) == 0:
        raise ValueError("an ensemble config needs at least one member")
    members: list[EnsembleMember] = []
    first_seen: dict[tuple[str, int | None], str] = {}
    for where, entry in named:
        if hasattr(entry, "to_dict") and not isinstance(entry, Mapping):
            entry = entry.to_dict()  # ml_collections.ConfigDict
        if not isinstance(entry, Mapping):
            raise ValueError(f"{where}: expected a dict, got {type(entry).__name__}: {entry!r}")
        unknown = sorted(set(entry) - set(_MEMBER_KEYS))
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {unknown}; allowed: {list(_MEMBER_KEYS)}")
        missing = [k for k in ("workdir", "weight") if k not in entry]
        if missing:
            raise ValueError(f"{where}: missing key(s) {missing}")
        try:
            member = EnsembleMember(
                workdir=entry["workdir"],
                weight=entry["weight"],
                image_size=entry.get("image_size"),
            )
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
        key = (member.workdir, member.image_size)
        if key in first_seen:
            raise ValueError(
                f"{where}: {member.workdir!r} at image_size {member.image_size} repeats "
                f"{first_seen[key]}"
            )
        first_seen[key] = where
        members.append(member)
    return members
