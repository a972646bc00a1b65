"""Input pipeline throughput: decoded, resized, flipped images/s per host core.

Reads TFRecords through the trainer's own `input_pipeline.create_train_dataset`
(interleave, shuffle, JPEG decode, resize, flip, batch) with tf.data's thread
pool limited to 1 core and to every core, so the per-core rate and the
scaling are both measured. Without `--data_dir` it first builds a synthetic
GLDv2-like set with the GLDv2 TFDS builder (JPEGs of GLDv2's typical 800 x 600
size in full mode). `--needed_img_s` (e.g. the train-step benchmark's rate
for a whole host) turns the per-core rate into the host cores it takes.

A second table (`stage_rows`, synthetic set only) splits one core's work on an
image into the stages of the trainer's path (JPEG decode, bilinear resize,
flip, rounding to uint8) and measures the DCT-domain downscaled decode
(`tf.image.decode_jpeg(ratio=2|4|8)`, where the JPEG stays at least the target
size on both sides) end to end, with its mean pixel difference from the
trainer's output: what decoding less would buy, and what it would change.

    python experiments/benchmarks/input_throughput.py --mode=full --output_dir=OUT
    python experiments/benchmarks/input_throughput.py --data_dir=gs://BUCKET/gldv2 --image_size=512
    python experiments/benchmarks/input_throughput.py --mode=small   # seconds
"""

from __future__ import annotations

import argparse
import glob
import os
import sys
import tempfile
import time
from typing import Any

import bench_report
import numpy as np
from PIL import Image

from data_pipelines import gldv2_builder
from landmark_jax.data import input_pipeline
from landmark_jax.runtime import tensorflow_setup


def synthetic_gldv2(root: str, num_images: int, width: int, height: int) -> str:
    """A train split of smooth random photos in GLDv2's layout; returns its data dir."""
    rng = np.random.default_rng(0)
    images_dir = os.path.join(root, "train")
    rows = ["id,url,landmark_id"]
    by_landmark: dict[int, list[str]] = {}
    for i in range(num_images):
        image_id = f"{i:016x}"
        # Upsampled noise: JPEG sizes like a photo's, unlike raw noise.
        small = rng.integers(0, 256, (height // 16, width // 16, 3), dtype=np.uint8)
        photo = Image.fromarray(small).resize((width, height), Image.BICUBIC)
        folder = os.path.join(images_dir, *image_id[:3])
        os.makedirs(folder, exist_ok=True)
        photo.save(os.path.join(folder, f"{image_id}.jpg"), quality=90)
        rows.append(f"{image_id},,{i % 50}")
        by_landmark.setdefault(i % 50, []).append(image_id)
    csv = os.path.join(root, "train.csv")
    with open(csv, "w") as f:
        f.write("\n".join(rows) + "\n")
    # Every image clean (the builder requires the file; cleanliness costs nothing here).
    with open(os.path.join(root, "train_clean.csv"), "w") as f:
        f.write("landmark_id,images\n")
        f.writelines(f"{k},{' '.join(v)}\n" for k, v in sorted(by_landmark.items()))
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


def _jpegs(root: str) -> list[bytes]:
    paths = sorted(glob.glob(os.path.join(root, "train", "*", "*", "*", "*.jpg")))
    return [open(p, "rb").read() for p in paths]


def _per_core_rate(jpegs: list[bytes], fn, repeats: int) -> float:
    """images/s of `fn` mapped over the JPEGs with tf.data on one core."""
    import tensorflow as tf

    ds = tf.data.Dataset.from_tensor_slices(jpegs).repeat(repeats).map(fn).batch(32)
    options = tf.data.Options()
    options.threading.private_threadpool_size = 1
    options.threading.max_intra_op_parallelism = 1
    ds = ds.with_options(options)
    for _ in ds.take(1):  # warm up: trace and allocate
        pass
    count, start = 0, time.perf_counter()
    for batch in ds:
        count += int(batch.shape[0])
    return count / (time.perf_counter() - start)


def stage_rows(jpegs: list[bytes], image_size: int, repeats: int) -> list[dict[str, Any]]:
    """One core's images/s for each stage of the train stream's image path,
    and for the DCT-scaled decode in its place.

    Args:
      jpegs: encoded JPEGs, all of one size.
      image_size: the square output size.
      repeats: passes over `jpegs` per measurement.

    Returns:
      Rows of `stage`, `img_s_per_core`, `ms_per_image`, `vs_trainer` (rate
      over the trainer path's) and, for the DCT-scaled paths, `mean_abs_diff`:
      mean |difference| from the trainer's uint8 output, in grey levels.
    """
    import tensorflow as tf

    size = [image_size, image_size]
    height, width = (int(v) for v in tf.image.extract_jpeg_shape(jpegs[0])[:2])

    def trainer_path(decoded):
        # input_pipeline's train parse without augmentation, every image flipped.
        return input_pipeline.to_uint8(tf.reverse(input_pipeline.resize_image(decoded, size), [1]))

    def scaled_decode(ratio):
        return lambda e: tf.image.decode_jpeg(e, channels=3, ratio=ratio)

    # A one-pixel slice keeps the batch from copying the stage's output.
    stages = [
        ("decode", lambda e: input_pipeline.decode_image(e)[:1, :1]),
        (
            "decode + resize",
            lambda e: input_pipeline.resize_image(input_pipeline.decode_image(e), size)[:1, :1],
        ),
        (
            "decode + resize + flip + uint8 (trainer)",
            lambda e: trainer_path(input_pipeline.decode_image(e)),
        ),
    ]
    ratios = [r for r in (2, 4, 8) if min(height, width) // r >= image_size]
    for r in ratios:
        stages.append((f"decode at 1/{r} (DCT)", lambda e, r=r: scaled_decode(r)(e)[:1, :1]))
        stages.append(
            (
                f"decode at 1/{r} + resize + flip + uint8",
                lambda e, r=r: trainer_path(scaled_decode(r)(e)),
            )
        )
    rows = [
        dict(stage=name, img_s_per_core=_per_core_rate(jpegs, fn, repeats)) for name, fn in stages
    ]
    trainer = rows[2]["img_s_per_core"]
    sample = jpegs[:16]
    reference = [
        trainer_path(input_pipeline.decode_image(e)).numpy().astype(np.int32) for e in sample
    ]
    for row in rows:
        row["ms_per_image"] = 1000 / row["img_s_per_core"]
        row["vs_trainer"] = row["img_s_per_core"] / trainer
    for r in ratios:
        scaled = [trainer_path(scaled_decode(r)(e)).numpy().astype(np.int32) for e in sample]
        diff = np.mean([np.abs(a - b).mean() for a, b in zip(scaled, reference, strict=True)])
        next(x for x in rows if x["stage"] == f"decode at 1/{r} + resize + flip + uint8")[
            "mean_abs_diff"
        ] = float(diff)
    return rows


def run(
    data_dir: str | None,
    image_size: int,
    num_images: int,
    width: int,
    height: int,
    needed_img_s: float | None,
    output_dir: str | None,
    stage_repeats: int = 1,
) -> dict[str, Any]:
    tensorflow_setup.hide_accelerators()
    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as tmp:
        source = data_dir or synthetic_gldv2(tmp, num_images, width, height)
        # The stages need the JPEG files, which only the synthetic set has here.
        stages = [] if data_dir else stage_rows(_jpegs(tmp), image_size, stage_repeats)
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
    stage_columns = ["stage", "img_s_per_core", "ms_per_image", "vs_trainer", "mean_abs_diff"]
    if stages:
        print(bench_report.format_table(stages, stage_columns))
    return bench_report.report(
        "input_throughput",
        rows,
        columns,
        output_dir,
        data=data_dir or f"synthetic {num_images} JPEGs {width}x{height}",
        needed_img_s=needed_img_s,
        stage_rows=stages,
        stage_columns=stage_columns,
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
        # 128 rows: the 1/2-scale decode (64) still covers the small mode's 64 px.
        height=600 if full else 128,
        needed_img_s=args.needed_img_s,
        output_dir=args.output_dir,
        stage_repeats=4 if full else 1,
    )


if __name__ == "__main__":
    sys.exit(main() and 0)
