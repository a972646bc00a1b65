"""What every benchmark shares: timing, the machine's description, its peak
rates, and the table + JSON each script writes.

A benchmark script compares rows measured in the same run on the same
machine; `report` prints them as a table and writes them, with the machine
and the command line, to JSON, so docs/benchmarks.md can quote ratios with
their provenance. Run as a script, it prints written JSON files as the
Markdown tables of docs/benchmarks.md:

    python experiments/benchmarks/bench_report.py OUT/*.json
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax

# Dense bf16 FLOP/s and memory bandwidth (bytes/s) per device, from the
# vendors' data sheets; a device missing here gets no share-of-peak column.
PEAK_RATES: dict[str, tuple[float, float]] = {
    "NVIDIA H200": (989e12, 4.8e12),
    "NVIDIA H100 80GB HBM3": (989e12, 3.35e12),
    "NVIDIA A100-SXM4-40GB": (312e12, 1.555e12),
    "NVIDIA A100-SXM4-80GB": (312e12, 2.039e12),
    "TPU v3": (61.5e12, 450e9),  # per core (a v3 chip has two)
    "TPU v4": (275e12, 1.2e12),
    "TPU v5 lite": (197e12, 819e9),
    "TPU v5p": (459e12, 2.765e12),
    "TPU v6 lite": (918e12, 1.64e12),
}


def machine() -> dict[str, Any]:
    """The machine a benchmark ran on: devices, host, library versions."""
    device = jax.devices()[0]
    info = {
        "platform": device.platform,
        "device_kind": device.device_kind,
        "device_count": jax.device_count(),
        "host_cpus": os.cpu_count(),
        "host": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "jax": jax.__version__,
    }
    try:
        import torch

        info["torch"] = torch.__version__
    except ImportError:
        pass
    return info


def peak_rates() -> tuple[float, float] | None:
    """(FLOP/s, bytes/s) of one device of this machine, if known."""
    return PEAK_RATES.get(jax.devices()[0].device_kind)


def seconds_per_call(
    fn: Callable[[], Any], *, warmup: int = 2, iterations: int = 5, repeats: int = 3
) -> float:
    """Median over `repeats` of the mean wall time of `iterations` calls.

    `fn` must wait for its result (`jax.block_until_ready` or a host value):
    a dispatched but unfinished call would time the dispatch only.
    """
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(iterations):
            fn()
        times.append((time.perf_counter() - start) / iterations)
    return sorted(times)[len(times) // 2]


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    """A fixed-width text table of `columns` (missing cells print as '-')."""

    def cell(value: Any) -> str:
        if value is None:
            return "-"
        if isinstance(value, float):
            return f"{value:.4g}"
        return str(value)

    cells = [[cell(row.get(c)) for c in columns] for row in rows]
    widths = [max([len(c), *(len(r[i]) for r in cells)]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in cells]
    return "\n".join(lines)


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    """The rows as a GitHub Markdown table (missing cells print as '-')."""

    def cell(value: Any) -> str:
        if value is None:
            return "-"
        if isinstance(value, float):
            return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
        return str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def report(
    name: str,
    rows: Sequence[dict[str, Any]],
    columns: Sequence[str],
    output_dir: str | None,
    **extra: Any,
) -> dict[str, Any]:
    """Prints the table and writes {output_dir}/{name}.json.

    Returns:
      The JSON payload: benchmark name, command, machine, rows and `extra`.
    """
    payload = {
        "benchmark": name,
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "machine": machine(),
        "rows": list(rows),
        **extra,
    }
    print(f"== {name} on {payload['machine']['device_kind']} x{jax.device_count()}")
    print(format_table(rows, columns))
    payload["columns"] = list(columns)
    if output_dir:
        os.makedirs(output_dir, exist_ok=True)
        with open(os.path.join(output_dir, f"{name}.json"), "w") as f:
            json.dump(payload, f, indent=1)
    return payload


def main(paths: Sequence[str]) -> None:
    for path in paths:
        with open(path) as f:
            payload = json.load(f)
        m = payload["machine"]
        print(f"### {payload['benchmark']}: {m['device_kind']} x{m['device_count']}")
        print(f"\n`{payload['command']}`\n")
        print(markdown_table(payload["rows"], payload["columns"]) + "\n")
        for key, rows in payload.items():  # extra tables, e.g. step_memory's head_rows
            if key.endswith("_rows") and rows:
                # Its own column list where the script wrote one, else every key.
                columns = payload.get(key.removesuffix("_rows") + "_columns")
                columns = columns or list(dict.fromkeys(k for row in rows for k in row))
                print(f"{key}:\n\n" + markdown_table(rows, columns) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
