r"""What the GLR2020 scorer did with a submitted SavedModel, with TensorFlow alone.

    python experiments/serving/score_saved_model.py --saved_model=EXPORT_DIR \
        --data=demo_data/raw [--embeddings_out=DIR] [--batch_checks=N]

Reads a GLDv2-layout folder (index.csv, test.csv, retrieval_solution.csv,
images at SPLIT/a/b/c/ID.jpg), embeds every index and test image with the
SavedModel's `serving_default` (uint8 [H, W, 3] -> {'global_descriptor'}),
ranks the index for each test image by Euclidean distance (k = 100, as the
competition did) and prints GLDv2's mAP@100 over the solution's Public and
Private queries (Usage 'Ignored' left out), as one JSON line per
--saved_model.

It imports neither JAX nor landmark_jax (a finder below refuses them; TF 2.20
would otherwise import an installed JAX from its lite utilities), so it
proves the SavedModel runs where only TensorFlow is; its mAP@100 is computed
here from the published definition, independently of
landmark_jax.retrieval.metrics. `--batch_checks=N` also runs `serving_batch`
on the first N images of each split, each with its mirror image (a batch of
one size), and reports its largest difference from `serving_default`.
"""

from __future__ import annotations

import importlib.abc
import sys

_REFUSED = ("jax", "jaxlib", "flax", "orbax", "landmark_jax")


class _RefuseJax(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in _REFUSED:
            raise ImportError(f"{name}: this check runs the SavedModel with TensorFlow alone")
        return None


sys.meta_path.insert(0, _RefuseJax())

import argparse  # noqa: E402
import csv  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402


def read_ids(path: str) -> list[str]:
    with open(path, newline="") as f:
        return [row["id"] for row in csv.DictReader(f)]


def image_path(root: str, split: str, image_id: str) -> str:
    return os.path.join(root, split, image_id[0], image_id[1], image_id[2], f"{image_id}.jpg")


def read_solution(path: str) -> dict[str, list[str]]:
    """Query id -> relevant index ids, Public and Private rows ('None': none)."""
    solution = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            if row["Usage"] == "Ignored":
                continue
            images = row["images"].split()
            solution[row["id"]] = [] if images == ["None"] else images
    return solution


def average_precision(ranked: list[str], relevant: list[str], k: int = 100) -> float:
    """GLDv2 AP@k: each hit at 0-based rank i adds hits/(i + 1); divided by min(|relevant|, k)."""
    if not relevant:
        return 0.0
    hits, total, seen = 0, 0.0, set()
    for i, image_id in enumerate(ranked[:k]):
        if image_id in seen:
            continue
        seen.add(image_id)
        if image_id in relevant:
            hits += 1
            total += hits / (i + 1)
    return total / min(len(relevant), k)


def embed_split(
    model, root: str, split: str, batch_checks: int, max_images: int | None = None
) -> tuple[list[str], np.ndarray, list]:
    """(ids, descriptors [N, D]) of a split's images through serving_default,
    and the largest |serving_batch - serving_default| of each checked image:
    a batch of the image and its mirror (one size) against the two singles."""
    single = model.signatures["serving_default"]
    ids = read_ids(os.path.join(root, f"{split}.csv"))[:max_images]
    rows, diffs = [], []
    for n, image_id in enumerate(ids):
        encoded = tf.io.read_file(image_path(root, split, image_id))
        image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
        rows.append(single(input_image=image)["global_descriptor"].numpy())
        if n < batch_checks:
            pair = tf.stack([image, image[:, ::-1]])
            batched = model.signatures["serving_batch"](input_images=pair)["global_descriptor"]
            mirrored = single(input_image=pair[1])["global_descriptor"].numpy()
            diffs.append(float(np.abs(batched.numpy() - np.stack([rows[-1], mirrored])).max()))
    return ids, np.stack(rows), diffs


def score(index_ids, index, test_ids, test, solution_path: str) -> tuple[float, int]:
    """GLDv2 mAP@100 of Euclidean kNN (k = 100) over the solution's queries."""
    # Squared Euclidean distances; ties broken by index order (a stable sort).
    distances = (test**2).sum(1)[:, None] + (index**2).sum(1)[None, :] - 2.0 * test @ index.T
    order = np.argsort(distances, axis=1, kind="stable")[:, :100]
    ranked = {q: [index_ids[j] for j in order[r]] for r, q in enumerate(test_ids)}
    solution = read_solution(solution_path)
    scores = [average_precision(ranked.get(q, []), relevant) for q, relevant in solution.items()]
    return float(np.mean(scores)), len(scores)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[1])
    parser.add_argument("--saved_model", required=True, action="append", help="repeatable")
    parser.add_argument("--data", required=True, help="a GLDv2-layout folder")
    parser.add_argument(
        "--splits",
        action="append",
        help="the splits to embed (default index,test), SPLIT:N for its first N images only: "
        "once for every model, or once each",
    )
    parser.add_argument("--solution", default=None, help="default: DATA/retrieval_solution.csv")
    parser.add_argument(
        "--embeddings_out", default=None, help="a folder: MODEL_NUMBER-SPLIT.npz (ids, descriptors)"
    )
    parser.add_argument(
        "--batch_checks", type=int, default=0, help="images per split to check serving_batch on"
    )

    args = parser.parse_args()

    split_lists = [s.split(",") for s in args.splits or ["index,test"]]
    if len(split_lists) == 1:
        split_lists *= len(args.saved_model)
    if len(split_lists) != len(args.saved_model):
        parser.error(f"{len(args.splits)} --splits for {len(args.saved_model)} --saved_model")
    for number, (path, splits) in enumerate(zip(args.saved_model, split_lists, strict=True)):
        model = tf.saved_model.load(path)
        report, rows, diffs = {"saved_model": path}, {}, []
        for item in splits:
            split, _, limit = item.partition(":")
            ids, descriptors, split_diffs = embed_split(
                model, args.data, split, args.batch_checks, int(limit) if limit else None
            )
            rows[split] = (ids, descriptors)
            diffs += split_diffs
            report[f"{split}_images"] = len(ids)
            report["descriptor_dim"] = int(descriptors.shape[1])
            if args.embeddings_out:
                os.makedirs(args.embeddings_out, exist_ok=True)
                out = os.path.join(args.embeddings_out, f"{number}-{split}.npz")
                np.savez(out, ids=np.array(ids), descriptors=descriptors)
        if diffs:
            report["batch_max_abs_diff"] = max(diffs)
        solution = args.solution or os.path.join(args.data, "retrieval_solution.csv")
        if {"index", "test"} <= set(splits) and os.path.exists(
            solution
        ):  # whole splits  # whole splits
            report["map@100"], report["queries"] = score(*rows["index"], *rows["test"], solution)
        print(json.dumps(report), flush=True)


if __name__ == "__main__":
    main()
