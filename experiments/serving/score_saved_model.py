r"""What the GLR2020 scorer did with a submitted SavedModel, with TensorFlow alone.

    python experiments/serving/score_saved_model.py --saved_model=EXPORT_DIR \
        --data=demo_data/raw [--embeddings_out=FILE.npz] [--check_batch]

Reads a GLDv2-layout folder (index.csv, test.csv, retrieval_solution.csv,
images at SPLIT/a/b/c/ID.jpg), embeds every index and test image with the
SavedModel's `serving_default` (uint8 [H, W, 3] -> {'global_descriptor'}),
ranks the index for each test image by Euclidean distance (k = 100, as the
competition did) and prints GLDv2's mAP@100 over the solution's Public and
Private queries (Usage 'Ignored' left out), as JSON.

It imports neither JAX nor landmark_jax (a finder below refuses them; TF 2.20
would otherwise import an installed JAX from its lite utilities), so it
proves the SavedModel runs where only TensorFlow is; its mAP@100 is computed
here from the published definition, independently of
landmark_jax.retrieval.metrics. `--check_batch` also runs `serving_batch` on
each group of same-sized images and reports its largest difference from the
single-image rows.
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
import collections  # noqa: E402
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[1])
    parser.add_argument("--saved_model", required=True)
    parser.add_argument("--data", required=True, help="a GLDv2-layout folder")
    parser.add_argument("--solution", default=None, help="default: DATA/retrieval_solution.csv")
    parser.add_argument("--embeddings_out", default=None, help="write ids and descriptors here")
    parser.add_argument("--check_batch", action="store_true")
    args = parser.parse_args()

    model = tf.saved_model.load(args.saved_model)
    single = model.signatures["serving_default"]
    rows, report = {}, {"batch_max_abs_diff": None}
    batch_diffs = []
    for split in ("index", "test"):
        ids = read_ids(os.path.join(args.data, f"{split}.csv"))
        images = [
            tf.io.decode_image(
                tf.io.read_file(image_path(args.data, split, i)),
                channels=3,
                expand_animations=False,
            )
            for i in ids
        ]
        rows[split] = (
            ids,
            np.stack([single(input_image=im)["global_descriptor"].numpy() for im in images]),
        )
        if args.check_batch:
            by_size = collections.defaultdict(list)
            for row, im in enumerate(images):
                by_size[tuple(im.shape)].append(row)
            for members in by_size.values():
                if len(members) < 2:
                    continue
                out = model.signatures["serving_batch"](
                    input_images=tf.stack([images[r] for r in members])
                )["global_descriptor"].numpy()
                batch_diffs.append(float(np.abs(out - rows[split][1][members]).max()))
    if args.check_batch:
        report["batch_max_abs_diff"] = max(batch_diffs) if batch_diffs else None
        report["batch_groups"] = len(batch_diffs)

    index_ids, index = rows["index"]
    test_ids, test = rows["test"]
    # Squared Euclidean distances; ties broken by index order (a stable sort).
    distances = (test**2).sum(1)[:, None] + (index**2).sum(1)[None, :] - 2.0 * test @ index.T
    order = np.argsort(distances, axis=1, kind="stable")[:, :100]
    ranked = {q: [index_ids[j] for j in order[r]] for r, q in enumerate(test_ids)}
    solution = read_solution(args.solution or os.path.join(args.data, "retrieval_solution.csv"))
    scores = [average_precision(ranked.get(q, []), relevant) for q, relevant in solution.items()]
    report.update(
        {
            "map@100": float(np.mean(scores)),
            "queries": len(scores),
            "index_images": len(index_ids),
            "test_images": len(test_ids),
            "descriptor_dim": int(index.shape[1]),
        }
    )
    if args.embeddings_out:
        np.savez(
            args.embeddings_out,
            index_ids=np.array(index_ids),
            index=index,
            test_ids=np.array(test_ids),
            test=test,
        )
    print(json.dumps(report))


if __name__ == "__main__":
    main()
