"""Descriptor extraction throughput: images/s at the recipes' sizes, bf16.

Times the evaluation's own jitted embedding (`extract.embed_views`: the
model, the flipped view when asked, the sum of unit descriptors) on a
synthetic batch split over every device, for each square size; the
multi-scale rows add the sizes of the scales 1/sqrt2, 1, sqrt2 as the
evaluation does (one pass per scale).

    python experiments/benchmarks/extraction.py --mode=full --output_dir=OUT
    python experiments/benchmarks/extraction.py --mode=small   # CPU, seconds
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from typing import Any

import bench_report
import jax
import numpy as np
from train_step import Row, project_config

from landmark_jax.models.factory import create_model
from landmark_jax.retrieval import extract
from landmark_jax.runtime import sharding
from landmark_jax.training import random_streams

MULTI_SCALE = (1 / math.sqrt(2), 1.0, math.sqrt(2))


def seconds_per_batch(embed, variables, mesh, batch: int, size: int, iterations: int) -> float:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8)
    images = jax.device_put(images, sharding.batch_sharding(mesh))
    return bench_report.seconds_per_call(
        lambda: jax.block_until_ready(embed(variables, images)), iterations=iterations
    )


def run(
    rows: dict[str, Row], sizes, *, flips=(False, True), iterations: int, output_dir: str | None
) -> dict:
    mesh = sharding.create_mesh()
    results = []
    for name, row in rows.items():
        config = project_config(row, num_classes=1000, dtype="bfloat16")
        model = create_model(config.model)
        variables = jax.jit(
            lambda key, model=model, config=config: random_streams.init_model_variables(
                model, key, config.image_size
            ),
            out_shardings=sharding.replicated_sharding(mesh),
        )(jax.random.key(0))
        for flip in flips:
            embed = extract.embed_views(model, flip, config.model.descriptor)
            per_size = {
                size: seconds_per_batch(embed, variables, mesh, row.batch_size, size, iterations)
                for size in sorted({*sizes, *(round(s * sizes[0]) for s in MULTI_SCALE)})
            }
            for size in sizes:
                results.append(
                    dict(
                        row=name,
                        size=size,
                        flip=flip,
                        scales="1",
                        img_s=row.batch_size / per_size[size],
                    )
                )
            multi = sum(per_size[round(s * sizes[0])] for s in MULTI_SCALE)
            results.append(
                dict(
                    row=name,
                    size=sizes[0],
                    flip=flip,
                    scales="1/sqrt2,1,sqrt2",
                    img_s=row.batch_size / multi,
                )
            )
    columns = ["row", "size", "flip", "scales", "img_s"]
    return bench_report.report("extraction", results, columns, output_dir)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=("small", "full"), default="small")
    parser.add_argument("--output_dir", default=os.environ.get("OUT"))
    args = parser.parse_args(argv)
    if args.mode == "full":
        rows = {
            "glr2020_b7": Row("glr2020_retrieval.py:clean", "efficientnet_b7", 512, 64, None),
            "glr2021_dolg_b5": Row("glr2021_dolg.py:step1", "efficientnet_b5", 512, 64, None),
        }
        return run(rows, (512, 640, 736), iterations=5, output_dir=args.output_dir)
    rows = {"demo_resnet_tiny": Row("demo.py:smoke", "resnet_tiny", 32, 16, None)}
    return run(rows, (32,), flips=(True,), iterations=2, output_dir=args.output_dir)


if __name__ == "__main__":
    sys.exit(main() and 0)
