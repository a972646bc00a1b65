"""Which images the demo data set has: the plan `make_demo_dataset` renders.

Every image is planned before any is drawn: its split, the scene it shows
(a landmark or a distractor), its label and, for test images, its role
(retrieval query, recognition image of a train landmark, or non-landmark
distractor) and Usage. The splits follow GLDv2 (see `make_demo_dataset`'s
docstring); `demo_layout` turns the plan into files and CSVs.
"""

from __future__ import annotations

import collections
import dataclasses
import math
from collections.abc import Sequence

import numpy as np

# GLDv2 train landmark ids run up to 203,093; demo ids are drawn from the same
# range, non-contiguous, so that builders must map them to labels 0..C-1.
_LANDMARK_ID_RANGE = 203_094
# Composition of the noisy (not clean) train images: correctly labelled but
# hard photographs, photographs of another landmark, non-landmark images.
_NOISE_MIX = {"correct": 0.5, "mislabelled": 0.3, "distractor": 0.2}
_HARD_DIFFICULTY = 1.8
_QUERIED_INDEX_FRACTION = 0.75
_INDEX_DISTRACTOR_FRACTION = 0.2
_RECOGNITION_IMAGES_PER_TRAIN_LANDMARK = 2.5
_TEST_DISTRACTOR_FRACTION = 0.5
_PUBLIC_FRACTION = 0.3


@dataclasses.dataclass
class Photo:
    """One planned image: where it goes, what it shows and how it is labelled."""

    split: str
    scene: tuple[str, int]  # ("landmark", landmark index) or ("distractor", index)
    difficulty: float = 1.0
    label: int | None = None  # train: the (possibly wrong) landmark id it is filed under
    clean: bool = False
    noise: str | None = None  # train noise kind, see _NOISE_MIX
    test_role: str | None = None  # "query", "recognition" or "distractor"
    truth: int | None = None  # landmark id actually shown (index and test)
    image_id: str = ""
    usage: str = ""


def long_tailed_counts(num_classes: int, max_count: int, rng: np.random.Generator) -> np.ndarray:
    """Class sizes from 2 up to `max_count`, few large classes and many small ones.

    The i-th of n sizes is 2 + (max_count - 2) * (1 - i / n)^3, rounded: the
    largest is max_count, the mean about 2 + (max_count - 2) / 4, and a good
    share of the classes have 2 or 3 images.

    Args:
      num_classes: how many sizes.
      max_count: the largest size, >= 2.
      rng: shuffles which class gets which size.

    Returns:
      int64 array of `num_classes` sizes, each in [2, max_count].
    """
    q = np.arange(num_classes) / num_classes
    counts = 2 + np.floor((max_count - 2) * (1 - q) ** 3 + 0.5).astype(np.int64)
    return rng.permutation(counts)


def _unique_hex_ids(rng: np.random.Generator, n: int) -> list[str]:
    """`n` distinct ids of 16 lowercase hex characters, like GLDv2 ids."""
    ids: list[str] = []
    seen: set[str] = set()
    while len(ids) < n:
        candidate = rng.bytes(8).hex()
        if candidate not in seen:
            seen.add(candidate)
            ids.append(candidate)
    return ids


def _split_usage(photos: Sequence[Photo], rng: np.random.Generator) -> None:
    """Marks about 30% Public and the rest Private, with both present when n >= 2."""
    n = len(photos)
    num_public = max(1, round(_PUBLIC_FRACTION * n)) if n >= 2 else 0
    order = rng.permutation(n)
    for rank, i in enumerate(order):
        photos[i].usage = "Public" if rank < num_public else "Private"


def plan_photos(
    num_landmarks: int,
    num_index_landmarks: int,
    max_images_per_landmark: int,
    noisy_fraction: float,
    num_non_landmark_references: int,
    rng: np.random.Generator,
) -> list[Photo]:
    """Decides every image of the data set, in a deterministic order.

    Args:
      num_landmarks: train landmarks.
      num_index_landmarks: index landmarks, disjoint from the train ones.
      max_images_per_landmark: the largest train class's clean images.
      noisy_fraction: share of train images outside train_clean.csv.
      num_non_landmark_references: images of the nonlandmark split.
      rng: the plan's random stream (ids, sizes, roles, usages).

    Returns:
      Every image of every split with its id, scene, label and role.
    """
    total_landmarks = num_landmarks + num_index_landmarks
    # Landmarks 0..num_landmarks-1 are train landmarks, the rest index landmarks.
    landmark_ids = rng.choice(_LANDMARK_ID_RANGE, size=total_landmarks, replace=False)
    photos: list[Photo] = []
    distractors = 0

    def distractor(split: str, **fields) -> Photo:
        nonlocal distractors
        distractors += 1
        return Photo(split, ("distractor", distractors - 1), **fields)

    clean_counts = long_tailed_counts(num_landmarks, max_images_per_landmark, rng)
    for lm, count in enumerate(clean_counts):
        for _ in range(count):
            photos.append(Photo("train", ("landmark", lm), label=int(landmark_ids[lm]), clean=True))
    num_noisy = round(noisy_fraction / (1 - noisy_fraction) * int(clean_counts.sum()))
    kinds = list(_NOISE_MIX)
    kind_counts = [math.floor(_NOISE_MIX[k] * num_noisy) for k in kinds]
    kind_counts[0] += num_noisy - sum(kind_counts)
    # Noise lands on classes in proportion to their size, as with web-mined labels.
    filed_under = rng.choice(num_landmarks, size=num_noisy, p=clean_counts / clean_counts.sum())
    filed = iter(filed_under.tolist())
    for kind, count in zip(kinds, kind_counts, strict=True):
        for _ in range(count):
            lm = next(filed)
            fields = dict(label=int(landmark_ids[lm]), noise=kind)
            if kind == "correct":
                photos.append(
                    Photo("train", ("landmark", lm), difficulty=_HARD_DIFFICULTY, **fields)
                )
            elif kind == "mislabelled":
                other = (lm + 1 + int(rng.integers(num_landmarks - 1))) % num_landmarks
                photos.append(Photo("train", ("landmark", other), **fields))
            else:
                photos.append(distractor("train", **fields))

    index_lms = np.arange(num_landmarks, total_landmarks)
    index_counts = long_tailed_counts(
        num_index_landmarks, max(2, max_images_per_landmark // 4), rng
    )
    for lm, count in zip(index_lms, index_counts, strict=True):
        for _ in range(count):
            photos.append(Photo("index", ("landmark", int(lm)), truth=int(landmark_ids[lm])))
    num_index_distractors = max(1, round(_INDEX_DISTRACTOR_FRACTION * int(index_counts.sum())))
    photos.extend(distractor("index") for _ in range(num_index_distractors))

    queried = rng.permutation(index_lms)[: max(1, round(_QUERIED_INDEX_FRACTION * len(index_lms)))]
    test: dict[str, list[Photo]] = collections.defaultdict(list)

    def test_photo(role: str, lm: int) -> Photo:
        return Photo("test", ("landmark", lm), test_role=role, truth=int(landmark_ids[lm]))

    for lm in sorted(int(x) for x in queried):
        test["query"].extend(test_photo("query", lm) for _ in range(int(rng.integers(1, 4))))
    # A train landmark is photographed again as often as it was before: the
    # recognition images follow the train set's long tail (drawn in
    # proportion to each landmark's clean train images), not one or two per
    # landmark whatever its size.
    num_recognition = max(1, round(_RECOGNITION_IMAGES_PER_TRAIN_LANDMARK * num_landmarks))
    drawn = rng.choice(num_landmarks, size=num_recognition, p=clean_counts / clean_counts.sum())
    test["recognition"] = [test_photo("recognition", lm) for lm in sorted(drawn.tolist())]
    num_test_distractors = max(
        1, round(_TEST_DISTRACTOR_FRACTION * (len(test["query"]) + len(test["recognition"])))
    )
    test["distractor"] = [
        distractor("test", test_role="distractor") for _ in range(num_test_distractors)
    ]
    for role in ("query", "recognition", "distractor"):
        _split_usage(test[role], rng)
        photos.extend(test[role])
    # Last, and without drawing from rng: the other splits do not depend on
    # how many reference images there are.
    photos.extend(distractor("nonlandmark") for _ in range(num_non_landmark_references))

    for photo, image_id in zip(photos, _unique_hex_ids(rng, len(photos)), strict=True):
        photo.image_id = image_id
    return photos
