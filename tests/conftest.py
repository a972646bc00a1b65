"""Test setup: 8 emulated CPU devices, so every test sees a multi-device mesh.

The XLA flag must be set before jax is first imported, which is why this sits
at the top of conftest.py (pytest imports it before any test module).
"""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def _check_eight_devices():
    assert jax.device_count() == 8, (
        f"tests expect 8 emulated CPU devices, got {jax.device_count()}; "
        "was jax imported before tests/conftest.py set XLA_FLAGS?"
    )
