"""Will the train step fit? Its compiled per-device peak against the device.

An XLA out-of-memory error comes deep in the first step, after minutes of
compiling, and names buffers, not config keys; `check_step_fits` compiles
the step ahead of time (the loop's first call reuses that executable) and
refuses one a device cannot hold, naming the keys that change it.
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import ml_collections

from landmark_jax.runtime import sharding
from landmark_jax.training import train_steps


def device_memory_limit() -> int | None:
    """Bytes one local device can hold (a TPU core, a GPU), or None (a CPU)."""
    stats = jax.local_devices()[0].memory_stats()
    return int(stats["bytes_limit"]) if stats and "bytes_limit" in stats else None


def check_step_fits(
    program: train_steps.Program, config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh
) -> int | None:
    """Compiles the train step ahead of time and refuses one a device cannot hold.

    The step is compiled here (the call that follows reuses that executable)
    and its per-device peak, XLA's own `memory_analysis` (arguments +
    outputs - aliased + temporaries), is compared with the device's
    `bytes_limit`. Devices that report no limit (CPUs) are not checked.

    Returns:
      The step's per-device peak in bytes; None where nothing was checked.

    Raises:
      ValueError: the step needs more than the device has, with both figures
        and the keys that change it.
    """
    limit = device_memory_limit()
    if limit is None:
        return None
    batch_sharding = sharding.batch_sharding(mesh)
    size = config.image_size
    batch = {
        "image": jax.ShapeDtypeStruct(
            (config.batch_size, size, size, 3), jnp.uint8, sharding=batch_sharding
        ),
        "label": jax.ShapeDtypeStruct((config.batch_size,), jnp.int32, sharding=batch_sharding),
        "is_clean": jax.ShapeDtypeStruct((config.batch_size,), jnp.int32, sharding=batch_sharding),
    }
    stats = program.step.lower(program.abstract, batch, program.consts).compile().memory_analysis()
    if stats is None:
        return None
    peak = (
        stats.argument_size_in_bytes
        + stats.output_size_in_bytes
        - stats.alias_size_in_bytes
        + stats.temp_size_in_bytes
    )
    if peak > limit:
        gib = 1 << 30
        per_device = config.batch_size // mesh.devices.size
        raise ValueError(
            f"the train step needs about {peak / gib:.2f} GiB per device (arguments "
            f"{stats.argument_size_in_bytes / gib:.2f} GiB, temporaries "
            f"{stats.temp_size_in_bytes / gib:.2f} GiB) but a device holds "
            f"{limit / gib:.2f} GiB: lower config.batch_size (now {config.batch_size}, "
            f"{per_device} per device) or config.image_size (now {size})"
            + (
                ", or set config.model.remat='blocks' (recompute each block in the backward pass)"
                if config.model.remat == "none"
                else ""
            )
        )
    logging.info("train step: %.2f of %.2f GiB per device", peak / (1 << 30), limit / (1 << 30))
    return peak
