"""Placing values on the 8-device mesh: replicated values every process holds alike."""

import jax
import numpy as np
import pytest

from landmark_jax.runtime import sharding


@pytest.mark.parametrize("processes", [1, 2])
def test_replicate_puts_a_full_copy_on_every_device(processes, monkeypatch):
    """One process: jax.device_put. Several (simulated): each process places its
    own copy (no cross-process equality check); the arrays are the same, in
    JAX's dtypes (float64 as float32 without x64) either way."""
    monkeypatch.setattr(jax, "process_count", lambda: processes)
    mesh = sharding.create_mesh()
    on_device = jax.device_put(np.float32(2.5))
    tree = {
        "kernel": np.arange(12, dtype=np.float32).reshape(3, 4),
        "margins": np.array([0.1, 0.3], np.float64),
        "scale": 30.0,
        "placed": on_device,
    }
    placed = sharding.replicate(tree, mesh)
    for key, value in tree.items():
        got = placed[key]
        assert isinstance(got, jax.Array), key
        assert got.sharding.is_equivalent_to(sharding.replicated_sharding(mesh), got.ndim), key
        assert len(got.addressable_shards) == 8, key
        want = np.asarray(value)
        want = want.astype(jax.dtypes.canonicalize_dtype(want.dtype))
        assert got.dtype == want.dtype, key
        for shard in got.addressable_shards:
            np.testing.assert_array_equal(np.asarray(shard.data), want, err_msg=key)


def test_place_splits_a_host_value_like_device_put(monkeypatch):
    """A class-sharded head kernel (split on its last axis), as a stage carried
    into a new run places it: each process's devices get their slices."""
    kernel = np.arange(4 * 16, dtype=np.float32).reshape(4, 16)
    target = jax.sharding.NamedSharding(
        sharding.create_mesh(), jax.sharding.PartitionSpec(None, sharding.DATA_AXIS)
    )
    want = jax.device_put(kernel, target)
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    got = sharding.place(kernel, target)
    assert got.sharding == target
    for a, b in zip(got.addressable_shards, want.addressable_shards, strict=True):
        assert a.device == b.device and a.index == b.index
        np.testing.assert_array_equal(np.asarray(a.data), np.asarray(b.data))
