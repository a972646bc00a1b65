"""Which example goes to which shard file of a GLDv2 build: the validation
split of train (per class, from its clean images) and the shard plan.
"""

from __future__ import annotations

import collections
from collections.abc import Sequence

import numpy as np

from data_pipelines import tfrecord_shard
from landmark_jax import data_format


def assign_val(
    examples: Sequence[tfrecord_shard.Example], val_fraction: float, rng: np.random.Generator
) -> np.ndarray:
    """Picks validation examples per class, never a class's last training image.

    Validation images come from the clean images of each class. A class with n
    clean images gives floor(f * n + u) of them (u uniform in [0, 1), so the
    expected fraction is f even for small classes), capped at n - 1 so every
    class keeps a clean image for training.
    """
    is_val = np.zeros(len(examples), bool)
    if val_fraction <= 0:
        return is_val
    by_label: dict[int, list[int]] = collections.defaultdict(list)
    for i, ex in enumerate(examples):
        if ex.is_clean:
            by_label[ex.label].append(i)
    for label in sorted(by_label):
        members = by_label[label]
        n_val = min(int(np.floor(val_fraction * len(members) + rng.random())), len(members) - 1)
        if n_val > 0:
            is_val[rng.choice(members, size=n_val, replace=False)] = True
    return is_val


def plan_shards(
    split: str,
    examples: Sequence[tfrecord_shard.Example],
    is_val: np.ndarray,
    num_shards: int,
    num_val_shards: int,
    rng: np.random.Generator,
) -> list[tuple[str, list[tfrecord_shard.Example]]]:
    """Assigns examples to shard files.

    Train and val examples are shuffled before dealing them round-robin, so
    every shard holds a mix of classes (the train pipeline interleaves a few
    shards at a time). Index and test keep CSV order in contiguous blocks:
    reading the shards in order gives the images in CSV order.
    """
    if split != "train":
        bounds = np.linspace(0, len(examples), num_shards + 1).astype(int)
        return [
            (
                data_format.shard_name(split, s, num_shards),
                list(examples[bounds[s] : bounds[s + 1]]),
            )
            for s in range(num_shards)
        ]
    plan = []
    for name, mask, n in (("train", ~is_val, num_shards), ("val", is_val, num_val_shards)):
        members = [examples[i] for i in rng.permutation(np.flatnonzero(mask))]
        if not members:
            continue
        plan += [(data_format.shard_name(name, s, n), members[s::n]) for s in range(n)]
    return plan
