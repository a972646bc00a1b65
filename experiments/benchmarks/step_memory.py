"""Train-step memory per device, from the compiled step's own analysis.

Nothing is allocated: the step is lowered with abstract inputs (shapes,
dtypes, shardings) and compiled, and XLA's `memory_analysis()` gives the
bytes of its arguments, outputs and temporaries on one device. Two tables:

1. The GLR2021 step (DOLG, sub-center ArcFace) with a 203,094-class x 3
   sub-center head, its classes split over the devices vs replicated.
2. The largest per-device batch of the GLR2020 B7 step at 512 px that fits
   a 16 GiB (TPU v3 core) and a 32 GiB (TPU v4 chip) device: memory is
   affine in the batch, so two compiles give the line and a third checks
   the prediction.
3. The steps of GLR2020's S1 (B7, 512 px, 8 per device), its last stage
   (B7, 736 px) and GLR2021's step 3 (DOLG-B5, 768 px) with and without
   `model.remat='blocks'`. On CPU the step is compiled with
   CPU_MEMORY_SCHEDULE (below): with XLA's CPU defaults remat saved nothing
   (EfficientNet-B0 at 224 px, 8 images, bf16: temp 1,071 -> 1,055 MiB),
   with it 876 -> 305 MiB.

    python experiments/benchmarks/step_memory.py --mode=full --output_dir=OUT
    python experiments/benchmarks/step_memory.py --mode=small   # CPU, seconds

Numbers are those of the machine's backend (run it on the accelerator the
figures are for); on CPU they are an estimate, XLA's CPU layouts and fusion
rather than a TPU's (which pads channels to 128 lanes and rematerialises on
its own when a program exceeds its memory).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

import bench_report
import jax
from train_step import Row, project_config, synthetic_label_map

from landmark_jax.runtime import sharding
from landmark_jax.training import train_steps

GIB = 1 << 30

# XLA's CPU pipeline removes jax.checkpoint's optimization barriers before
# its CSE (which then merges the recomputation into the forward pass) and
# schedules for concurrency (which would hoist it anyway), so a CPU compile
# shows no remat saving. Kept barriers and the memory-minimising scheduler,
# as the accelerator compilers schedule, show it: 16 checkpointed blocks of
# four tanh(x @ w) layers on 8,192 x 512 rows, temp 1,103 -> 352 MiB, and the
# executed program's peak RSS 1,514 -> 773 MiB.
CPU_MEMORY_SCHEDULE = {
    "xla_disable_hlo_passes": "cse_barrier_expander",
    "xla_cpu_enable_concurrency_optimized_scheduler": False,
}


# Compiled steps already measured in this run, by (row, mesh, classes, dtype,
# remat, head keys): the remat table's 'none' row is often a batch the
# largest-batch search has compiled.
_measured: dict[tuple, dict[str, int]] = {}


def compiled_bytes(
    row: Row, mesh, num_classes: int, dtype: str, remat: str = "none", **head: Any
) -> dict[str, int]:
    """Per-device bytes of the compiled train step of `row` (nothing allocated;
    each distinct step compiled once per run).

    Args:
      row: the config, backbone, image size and global batch.
      mesh: the device mesh.
      num_classes: classes of the head.
      dtype: the model's compute dtype.
      remat: model.remat ('none' or 'blocks').
      **head: config.head overrides (num_subcenters, shard_classes).

    Returns:
      argument, output, alias and temp bytes, and `peak` = argument + output
      - alias + temp: what one device holds while the step runs.
    """
    key = (row, mesh, num_classes, dtype, remat, tuple(sorted(head.items())))
    if key not in _measured:
        _measured[key] = _compile_and_measure(row, mesh, num_classes, dtype, remat, head)
    return dict(_measured[key])


def _compile_and_measure(row: Row, mesh, num_classes: int, dtype: str, remat: str, head) -> dict:
    # XLA's own convolutions, as on an accelerator: the CPU default (im2col)
    # would count its k x k patch buffers, which a TPU or GPU never holds.
    config = project_config(row, num_classes, dtype, conv_lowering="xla")
    config.model.remat = remat
    for key, value in head.items():
        config.head[key] = value
    program = train_steps.build_program(config, mesh, synthetic_label_map(num_classes))
    batch_sharding = sharding.batch_sharding(mesh)
    size = (row.batch_size, row.image_size, row.image_size, 3)
    batch = {
        "image": jax.ShapeDtypeStruct(size, "uint8", sharding=batch_sharding),
        "label": jax.ShapeDtypeStruct((row.batch_size,), "int32", sharding=batch_sharding),
        "is_clean": jax.ShapeDtypeStruct((row.batch_size,), "int32", sharding=batch_sharding),
    }
    lowered = program.step.lower(program.abstract, batch, program.consts)
    cpu = jax.default_backend() == "cpu"
    analysis = lowered.compile(compiler_options=CPU_MEMORY_SCHEDULE if cpu else None)
    stats = analysis.memory_analysis()
    out = {
        "argument": int(stats.argument_size_in_bytes),
        "output": int(stats.output_size_in_bytes),
        "alias": int(stats.alias_size_in_bytes),
        "temp": int(stats.temp_size_in_bytes),
    }
    out["peak"] = out["argument"] + out["output"] - out["alias"] + out["temp"]
    return out


def head_rows(row: Row, mesh, num_classes: int, subcenters: int, dtype: str) -> list[dict]:
    """The step with the big head, its classes split over the devices or not."""
    rows = []
    for shard in (True, False):
        got = compiled_bytes(
            row, mesh, num_classes, dtype, num_subcenters=subcenters, shard_classes=shard
        )
        rows.append(
            {
                "table": "head",
                "backbone": row.backbone,
                "classes": f"{num_classes}x{subcenters}",
                "head_split": shard,
                "global_batch": row.batch_size,
                **{f"{k}_gib": v / GIB for k, v in got.items()},
            }
        )
    return rows


def remat_rows(rows: list[tuple[Row, int]], mesh, dtype: str, **head: Any) -> list[dict]:
    """Each row's step with and without model.remat='blocks' (num_classes each;
    `head`: config.head overrides)."""
    out = []
    for row, num_classes in rows:
        peaks = {}
        for remat in ("none", "blocks"):
            got = compiled_bytes(row, mesh, num_classes, dtype, remat=remat, **head)
            peaks[remat] = got["peak"]
            out.append(
                {
                    "table": "remat",
                    "config": row.config,
                    "backbone": row.backbone,
                    "image_size": row.image_size,
                    "batch_per_device": row.batch_size // mesh.devices.size,
                    "remat": remat,
                    "temp_gib": got["temp"] / GIB,
                    "peak_gib": got["peak"] / GIB,
                }
            )
        out[-1]["saved_fraction"] = 1 - peaks["blocks"] / peaks["none"]
    return out


def max_batch_rows(
    row: Row, mesh, num_classes: int, dtype: str, budgets_gib, **head: Any
) -> list[dict]:
    """The largest per-device batch of `row`'s step within each budget (GiB;
    `head`: config.head overrides)."""
    devices = mesh.devices.size

    def peak(per_device: int) -> int:
        batch = Row(row.config, row.backbone, row.image_size, per_device * devices, None)
        return compiled_bytes(batch, mesh, num_classes, dtype, **head)["peak"]

    rows = []
    measured: dict[int, int] = {}
    for budget in budgets_gib:
        found, measured = largest_batch_within(peak, budget * GIB, measured)
        per_image = (measured[4] - measured[2]) / 2
        rows.append(
            {
                "table": "max_batch",
                "backbone": row.backbone,
                "image_size": row.image_size,
                "budget_gib": budget,
                "fixed_gib": (measured[2] - 2 * per_image) / GIB,
                "per_image_mib": per_image / (1 << 20),
                "max_batch_per_device": found,
                "peak_at_max_gib": found and measured[found] / GIB,
                "compiles": len(measured),
            }
        )
    return rows


def largest_batch_within(
    peak, limit: float, measured: dict[int, int] | None = None, tries: int = 4
) -> tuple[int | None, dict[int, int]]:
    """A batch close to the largest whose `peak(batch)` bytes fit in `limit`.

    Memory is close to affine in the batch: a line through batches 2 and 4
    predicts the largest one, a compile at the prediction checks it, and while
    it overshoots (XLA's choices change with the batch) the line is redrawn
    through the last two points (the secant method), at most `tries` times.

    Args:
      peak: per-device bytes of the step at a per-device batch (a compile).
      limit: the device's bytes.
      measured: peaks already known, by batch (reused across budgets).
      tries: predictions checked at most.

    Returns:
      (the batch, or None when none was found to fit; every peak measured).
    """
    measured = dict(measured or {})
    for b in (2, 4):
        if b not in measured:
            measured[b] = peak(b)
    low, high = 2, 4
    for _ in range(tries):
        slope = (measured[high] - measured[low]) / (high - low)
        if slope <= 0:
            return None, measured
        guess = int(low + (limit - measured[low]) // slope)
        if guess < 1:
            return None, measured
        if guess not in measured:
            measured[guess] = peak(guess)
        if measured[guess] <= limit:
            return guess, measured
        low, high = (high, guess) if guess > high else (low, guess)
    return None, measured


def run(mode: str, output_dir: str | None = None, tables=("head", "max_batch")) -> dict[str, Any]:
    mesh = sharding.create_mesh()
    devices = mesh.devices.size
    dtype = "bfloat16"
    if mode == "full":
        head_row = Row("glr2021_dolg.py:step1", "efficientnet_b5", 512, 4 * devices, None)
        b7 = Row("glr2020_retrieval.py:clean", "efficientnet_b7", 512, devices, None)
        head = lambda: head_rows(head_row, mesh, 203_094, 3, dtype)  # noqa: E731
        max_batch = lambda: max_batch_rows(b7, mesh, 81_313, dtype, (16, 32))  # noqa: E731
        # GLR2020's S1 batch (8 per core) at its first and last sizes, and
        # GLR2021's step 3 (768 px).
        remat = lambda: remat_rows(  # noqa: E731
            [
                (
                    Row("glr2020_retrieval.py:clean", "efficientnet_b7", 512, 8 * devices, None),
                    81_313,
                ),
                (
                    Row("glr2020_retrieval.py:full736", "efficientnet_b7", 736, 4 * devices, None),
                    203_094,
                ),
                (Row("glr2021_dolg.py:step3", "efficientnet_b5", 768, 4 * devices, None), 81_313),
            ],
            mesh,
            dtype,
        )
    else:
        # The GLR2021 head on the demo's small backbone: the head's share
        # shows. Every table is of its split step (2 per device is the head
        # table's row, so each table reuses the steps compiled before it).
        head_row = Row("demo.py:smoke", "resnet_tiny", 32, 2 * devices, None)
        split = {"num_subcenters": 3, "shard_classes": True}
        head = lambda: head_rows(head_row, mesh, 203_094, 3, dtype)  # noqa: E731
        max_batch = lambda: max_batch_rows(  # noqa: E731
            head_row, mesh, 203_094, dtype, (0.25,), **split
        )
        remat = lambda: remat_rows([(head_row, 203_094)], mesh, dtype, **split)  # noqa: E731
    rows = (head() if "head" in tables else []) + (max_batch() if "max_batch" in tables else [])
    rows += remat() if "remat" in tables else []
    head_columns = ["backbone", "classes", "head_split", "global_batch", "argument_gib"]
    head_columns += ["temp_gib", "peak_gib"]
    batch_columns = ["backbone", "image_size", "budget_gib", "fixed_gib", "per_image_mib"]
    batch_columns += ["max_batch_per_device", "peak_at_max_gib", "compiles"]
    remat_columns = ["config", "backbone", "image_size", "batch_per_device", "remat"]
    remat_columns += ["temp_gib", "peak_gib", "saved_fraction"]
    print(bench_report.format_table([r for r in rows if r["table"] == "head"], head_columns))
    print(bench_report.format_table([r for r in rows if r["table"] == "remat"], remat_columns))
    return bench_report.report(
        "step_memory",
        [r for r in rows if r["table"] == "max_batch"],
        batch_columns,
        output_dir,
        head_rows=[r for r in rows if r["table"] == "head"],
        remat_rows=[r for r in rows if r["table"] == "remat"],
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=("small", "full"), default="small")
    parser.add_argument(
        "--tables", default="head,max_batch,remat", help="any of head, max_batch, remat"
    )
    parser.add_argument("--output_dir", default=os.environ.get("OUT"))
    args = parser.parse_args(argv)
    return run(args.mode, args.output_dir, tuple(args.tables.split(",")))


if __name__ == "__main__":
    sys.exit(main() and 0)
