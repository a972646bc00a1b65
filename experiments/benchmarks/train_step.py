"""Train-step throughput: the project's step beside a bare jit step and timm.

Each row times three steps of the same backbone on the same synthetic batch:

- project: `train_steps.build_program` of the recipe's own config (its model,
  its cosine head over `--num_classes` classes with the recipe's margins and
  class weights, its optimizer, the state donated, the batch split over every
  device, the head's classes split too), in bfloat16;
- bare: `jax.jit` of the same backbone, mean pooling, a 1000-class softmax
  and SGD with momentum, data-parallel on the same mesh: what a step costs
  without the project (its head, its loss, its bookkeeping);
- timm: the same backbone in PyTorch (bf16 autocast, channels_last, SGD), on
  CUDA when there is one, only where torch and timm are installed.

It reports images/s, the project's share of the bare step's rate, and the
FLOP rate XLA's cost analysis implies as a share of the device's peak.

    python experiments/benchmarks/train_step.py --mode=full --output_dir=OUT
    python experiments/benchmarks/train_step.py --mode=small   # CPU, seconds

`--conv_lowering=xla|im2col` times both JAX steps with the backbone's
convolutions lowered one way (default auto: im2col + matmul on a CPU, XLA's
convolution elsewhere; models/conv_lowering.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from typing import Any

import bench_report
import jax
import jax.numpy as jnp
import numpy as np
import optax

from landmark_jax import config_files
from landmark_jax.data import data_format
from landmark_jax.models import backbones, conv_lowering
from landmark_jax.runtime import sharding
from landmark_jax.training import train_steps
from landmark_jax.workdir import run_config

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@dataclasses.dataclass(frozen=True)
class Row:
    """One benchmark row: a recipe config with its backbone, size and batch."""

    config: str  # configs/NAME.py:ARG
    backbone: str
    image_size: int
    batch_size: int
    timm_name: str | None  # the same backbone in timm; None: not in timm


# The full benchmark's rows: the recipes' backbones at their training sizes and batches.
FULL_ROWS = {
    "b0_224": Row("glr2020_retrieval.py:clean", "efficientnet_b0", 224, 256, "efficientnet_b0"),
    "b5_456": Row("glr2020_retrieval.py:clean", "efficientnet_b5", 456, 32, "efficientnet_b5"),
    "b7_512": Row("glr2020_retrieval.py:clean", "efficientnet_b7", 512, 16, "efficientnet_b7"),
    "dolg_r101_512": Row("dolg_paper.py:r101", "resnet101", 512, 32, "resnet101"),
    "dolg_b5_512": Row("glr2021_dolg.py:step1", "efficientnet_b5", 512, 32, "efficientnet_b5"),
}
# Seconds on a CPU: the same code paths at toy sizes (framework overhead).
SMALL_ROWS = {
    "resnet_tiny_32": Row("demo.py:smoke", "resnet_tiny", 32, 16, None),
    # The demo's own step (make demo trains it on 2 CPU cores).
    "demo_resnet_small_64": Row("demo.py", "resnet_small", 64, 32, None),
    # A real EfficientNet on a CPU (depthwise convolutions): minutes with XLA's.
    "efficientnet_b0_128": Row("glr2020_retrieval.py:clean", "efficientnet_b0", 128, 16, None),
    "dolg_efficientnet_tiny_32": Row(
        "glr2021_dolg.py:step1,smoke", "efficientnet_tiny", 32, 16, None
    ),
}


def synthetic_label_map(num_classes: int, seed: int = 0) -> data_format.LabelMap:
    """Class counts with GLDv2's long tail (Zipf-like, 2 to 1000 images)."""
    rng = np.random.default_rng(seed)
    counts = np.clip(rng.zipf(1.6, num_classes), 2, 1000).astype(np.int64)
    return data_format.LabelMap(
        landmark_ids=np.arange(num_classes, dtype=np.int64),
        counts=counts,
        clean_counts=counts,
        train_val_counts=counts,
        train_val_clean_counts=counts,
    )


def synthetic_batch(mesh, batch_size: int, image_size: int, num_classes: int) -> dict:
    """A global batch of random uint8 images and labels, split over the mesh."""
    rng = np.random.default_rng(0)
    batch = {
        "image": rng.integers(0, 256, (batch_size, image_size, image_size, 3), dtype=np.uint8),
        "label": rng.integers(0, num_classes, batch_size, dtype=np.int32),
        "is_clean": np.ones(batch_size, np.int32),
    }
    return jax.device_put(batch, sharding.batch_sharding(mesh))


def project_config(row: Row, num_classes: int, dtype: str, conv_lowering: str = "auto"):
    """The recipe's config with the row's backbone, size, batch, dtype and
    convolution lowering."""
    config = config_files.load(f"{REPO}/configs/{row.config}")
    config.model.backbone = row.backbone
    config.model.dtype = dtype
    config.model.conv_lowering = conv_lowering
    config.image_size = row.image_size
    config.batch_size = row.batch_size
    config.num_classes = num_classes
    config.init.backbone = ""
    config.init.checkpoint = ""
    return run_config.resolve_training_config(config)


def _flops(compiled) -> float | None:
    analysis = compiled.cost_analysis()
    if isinstance(analysis, list | tuple):  # older jax: one dict per program
        analysis = analysis[0] if analysis else {}
    flops = (analysis or {}).get("flops")
    return float(flops) if flops and flops > 0 else None


def time_project(
    row: Row,
    mesh,
    num_classes: int,
    dtype: str,
    iterations: int,
    repeats: int,
    conv_lowering: str = "auto",
) -> dict:
    """images/s and per-device FLOPs of the project's own train step."""
    config = project_config(row, num_classes, dtype, conv_lowering)
    program = train_steps.build_program(config, mesh, synthetic_label_map(num_classes))
    batch = synthetic_batch(mesh, row.batch_size, row.image_size, num_classes)
    state = program.initial_state()
    compiled = program.step.lower(state, batch, program.consts).compile()
    holder = {"state": state}

    def step():
        holder["state"], metrics = compiled(holder["state"], batch, program.consts)
        return float(metrics["loss"])

    seconds = bench_report.seconds_per_call(step, iterations=iterations, repeats=repeats)
    return {"seconds": seconds, "flops": _flops(compiled)}


def time_bare(
    row: Row, mesh, dtype: str, iterations: int, repeats: int, conv_lowering: str = "auto"
) -> dict:
    """images/s of a plain jit step: backbone, mean pool, 1000-way softmax, SGD."""
    import flax.linen as nn

    class Classifier(nn.Module):
        @nn.compact
        def __call__(self, x, train: bool):
            backbone = backbones.create_backbone(
                row.backbone, dtype=jnp.dtype(dtype), conv_lowering=conv_lowering
            )
            features = backbone(x, train=train)["final"]
            pooled = jnp.mean(features.astype(jnp.float32), axis=(1, 2))
            return nn.Dense(1000)(pooled)

    model = Classifier()
    tx = optax.sgd(0.01, momentum=0.9)
    batch = synthetic_batch(mesh, row.batch_size, row.image_size, 1000)
    replicated = sharding.replicated_sharding(mesh)

    def init(key):
        variables = model.init(key, batch["image"][:1], train=False)
        return {"variables": variables, "opt_state": tx.init(variables["params"])}

    def step(state, batch):
        def loss_fn(params):
            logits, updates = model.apply(
                {**state["variables"], "params": params},
                batch["image"],
                train=True,
                mutable=["batch_stats"],
                # EfficientNet's stochastic depth (B0-B7: 0.2) draws from it.
                rngs={"dropout": jax.random.key(1)},
            )
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
            return loss.mean(), updates

        params = state["variables"]["params"]
        (loss, updates), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        deltas, opt_state = tx.update(grads, state["opt_state"], params)
        variables = {**updates, "params": optax.apply_updates(params, deltas)}
        return {"variables": variables, "opt_state": opt_state}, loss

    state = jax.jit(init, out_shardings=replicated)(jax.random.key(0))
    compiled = jax.jit(step, donate_argnums=0).lower(state, batch).compile()
    holder = {"state": state}

    def call():
        holder["state"], loss = compiled(holder["state"], batch)
        return float(loss)

    seconds = bench_report.seconds_per_call(call, iterations=iterations, repeats=repeats)
    return {"seconds": seconds}


def time_timm(row: Row, iterations: int, repeats: int) -> dict | None:
    """images/s of timm's model of the same backbone, or None without torch/timm."""
    try:
        import timm
        import torch
    except ImportError:
        return None
    if row.timm_name is None:
        return None
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = timm.create_model(row.timm_name, num_classes=1000).to(device)
    model = model.to(memory_format=torch.channels_last).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    size = (row.batch_size, 3, row.image_size, row.image_size)
    images = torch.randn(size, device=device).to(memory_format=torch.channels_last)
    labels = torch.randint(0, 1000, (row.batch_size,), device=device)

    def step():
        with torch.autocast(device_type=device, dtype=torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return float(loss)  # waits for the device

    seconds = bench_report.seconds_per_call(step, iterations=iterations, repeats=repeats)
    return {"seconds": seconds}


def run(
    rows: dict[str, Row],
    *,
    num_classes: int,
    dtype: str = "bfloat16",
    iterations: int = 5,
    repeats: int = 3,
    with_timm: bool = True,
    output_dir: str | None = None,
    conv_lowering: str = "auto",
) -> dict[str, Any]:
    """Times every row; returns the report's JSON payload."""
    mesh = sharding.create_mesh()
    peak = bench_report.peak_rates()
    results = []
    for name, row in rows.items():
        project = time_project(row, mesh, num_classes, dtype, iterations, repeats, conv_lowering)
        bare = time_bare(row, mesh, dtype, iterations, repeats, conv_lowering)
        timm_result = time_timm(row, iterations, repeats) if with_timm else None
        result = {
            "row": name,
            "config": row.config,
            "backbone": row.backbone,
            "image_size": row.image_size,
            "batch": row.batch_size,
            "project_img_s": row.batch_size / project["seconds"],
            "bare_img_s": row.batch_size / bare["seconds"],
            "project_vs_bare": bare["seconds"] / project["seconds"],
            "timm_img_s": timm_result and row.batch_size / timm_result["seconds"],
        }
        if timm_result:
            result["project_vs_timm"] = timm_result["seconds"] / project["seconds"]
        if project["flops"]:
            result["tflop_s_per_device"] = project["flops"] / project["seconds"] / 1e12
            if peak:
                result["share_of_peak_flops"] = project["flops"] / project["seconds"] / peak[0]
        results.append(result)
    columns = [
        "row",
        "image_size",
        "batch",
        "project_img_s",
        "bare_img_s",
        "project_vs_bare",
        "timm_img_s",
        "project_vs_timm",
        "tflop_s_per_device",
        "share_of_peak_flops",
    ]
    return bench_report.report(
        "train_step",
        results,
        columns,
        output_dir,
        num_classes=num_classes,
        dtype=dtype,
        iterations=iterations,
        conv_lowering=conv_lowering,
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=("small", "full"), default="small")
    parser.add_argument("--rows", default="", help="comma-separated row names (default: all)")
    parser.add_argument("--num_classes", type=int, default=None, help="81313 full, 1000 small")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--iterations", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=3, help="timings; the median is kept")
    parser.add_argument("--no_timm", action="store_true")
    parser.add_argument(
        "--conv_lowering",
        default="auto",
        choices=conv_lowering.CONV_LOWERINGS,
        help="model.conv_lowering of both JAX steps (auto: im2col on a CPU)",
    )
    parser.add_argument("--output_dir", default=os.environ.get("OUT"))
    args = parser.parse_args(argv)
    table = FULL_ROWS if args.mode == "full" else SMALL_ROWS
    names = [n for n in args.rows.split(",") if n] or list(table)
    unknown = [n for n in names if n not in table]
    if unknown:
        parser.error(f"unknown rows {unknown} for --mode={args.mode}; valid: {sorted(table)}")
    return run(
        {n: table[n] for n in names},
        num_classes=args.num_classes or (81_313 if args.mode == "full" else 1000),
        dtype=args.dtype,
        iterations=args.iterations or (10 if args.mode == "full" else 3),
        repeats=args.repeats,
        with_timm=not args.no_timm,
        output_dir=args.output_dir,
        conv_lowering=args.conv_lowering,
    )


if __name__ == "__main__":
    sys.exit(main() and 0)
