"""Input pipeline throughput: decoded, resized, flipped images/s per host core.

Reads TFRecords through the trainer's own `input_pipeline.create_train_dataset`
(interleave, shuffle, JPEG decode, resize, flip, batch) with tf.data's thread
pool limited to 1 core and to every core, so the per-core rate and the
scaling are both measured. Without `--data_dir` it first builds a synthetic
GLDv2-like set with the GLDv2 TFDS builder (JPEGs of GLDv2's typical 800 x 600
size in full mode). `--needed_img_s` (e.g. the train-step benchmark's rate
for a whole host) turns the per-core rate into the host cores it takes.

    python experiments/benchmarks/input_throughput.py --mode=full --output_dir=OUT
    python experiments/benchmarks/input_throughput.py --data_dir=gs://BUCKET/gldv2 --image_size=512
    python experiments/benchmarks/input_throughput.py --mode=small   # seconds
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from typing import Any

import bench_report
import numpy as np
from PIL import Image

from data_pipelines import gldv2_builder
from landmark_jax import input_pipeline, tensorflow_setup


def synthetic_gldv2(root: str, num_images: int, width: int, height: int) -> str:
    """A train split of smooth random photos in GLDv2's layout; returns its data dir."""
    rng = np.random.default_rng(0)
    images_dir = os.path.join(root, "train")
    rows = ["id,url,landmark_id"]
    for i in range(num_images):
        image_id = f"{i:016x}"
        # Upsampled noise: JPEG sizes like a photo's, unlike raw noise.
        small = rng.integers(0, 256, (height // 16, width // 16, 3), dtype=np.uint8)
        photo = Image.fromarray(small).resize((width, height), Image.BICUBIC)
        folder = os.path.join(images_dir, *image_id[:3])
        os.makedirs(folder, exist_ok=True)
        photo.save(os.path.join(folder, f"{image_id}.jpg"), quality=90)
        rows.append(f"{image_id},,{i % 50}")
    csv = os.path.join(root, "train.csv")
    with open(csv, "w") as f:
        f.write("\n".join(rows) + "\n")
    import tensorflow_datasets as tfds

    config = gldv2_builder.Gldv2Config(name="throughput", val_fraction=0.0, retrieval_splits=False)
    builder = gldv2_builder.Gldv2(config=config, data_dir=os.path.join(root, "tfds"))
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=root, num_shards=8)
    )
    return str(builder.data_dir)


def images_per_second(data_dir: str, image_size: int, threads: int, num_images: int) -> float:
    """Rate of the training stream with tf.data's pool limited to `threads`."""
    import tensorflow as tf

    batch = 32
    ds = input_pipeline.create_train_dataset(
        data_dir, image_size=image_size, local_batch_size=batch, seed=0, shuffle_buffer=256
    )
    options = tf.data.Options()
    options.threading.private_threadpool_size = threads
    options.threading.max_intra_op_parallelism = 1
    it = iter(ds.with_options(options))
    next(it)  # warm up: open the files, fill the buffers
    steps = max(num_images // batch, 2)
    start = time.perf_counter()
    for _ in range(steps):
        next(it)
    return steps * batch / (time.perf_counter() - start)


def run(
    data_dir: str | None,
    image_size: int,
    num_images: int,
    width: int,
    height: int,
    needed_img_s: float | None,
    output_dir: str | None,
) -> dict[str, Any]:
    tensorflow_setup.hide_accelerators()
    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as tmp:
        source = data_dir or synthetic_gldv2(tmp, num_images, width, height)
        rows = []
        for threads in sorted({1, cores}):
            rate = images_per_second(source, image_size, threads, num_images)
            rows.append(
                dict(
                    image_size=image_size,
                    threads=threads,
                    img_s=rate,
                    img_s_per_core=rate / threads,
                )
            )
    per_core = rows[0]["img_s_per_core"]
    if needed_img_s:
        for row in rows:
            row["cores_for_needed"] = needed_img_s / per_core
    columns = ["image_size", "threads", "img_s", "img_s_per_core", "cores_for_needed"]
    return bench_report.report(
        "input_throughput",
        rows,
        columns,
        output_dir,
        data=data_dir or f"synthetic {num_images} JPEGs {width}x{height}",
        needed_img_s=needed_img_s,
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=("small", "full"), default="small")
    parser.add_argument("--data_dir", default=None, help="TFRecords to read (default: built)")
    parser.add_argument("--image_size", type=int, default=None)
    parser.add_argument("--needed_img_s", type=float, default=None)
    parser.add_argument("--output_dir", default=os.environ.get("OUT"))
    args = parser.parse_args(argv)
    full = args.mode == "full"
    return run(
        args.data_dir,
        args.image_size or (512 if full else 64),
        num_images=2048 if full else 96,
        width=800 if full else 160,
        height=600 if full else 120,
        needed_img_s=args.needed_img_s,
        output_dir=args.output_dir,
    )


if __name__ == "__main__":
    sys.exit(main() and 0)
