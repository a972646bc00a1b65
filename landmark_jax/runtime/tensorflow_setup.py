"""TensorFlow on the host only: the entry points hide the accelerators from it.

JAX owns the accelerators. TensorFlow (tf.data, gs:// file access, ScaNN's op
library, the Keras converter) would otherwise claim every GPU's memory on its
first op. So each program calls `hide_accelerators()` once at start-up,
before any TensorFlow op runs (`landmark_jax.train` and `landmark_jax.evaluate`
in `program_start.start`; `landmark_jax.models.keras_import` and the
`data_pipelines` builders in their `main`), and modules simply
`import tensorflow as tf`.
"""

from __future__ import annotations

import contextlib


def hide_accelerators() -> None:
    """Makes the GPUs and TPUs invisible to TensorFlow (a no-op once TF's
    devices are initialised, or where there are none)."""
    import tensorflow as tf

    for kind in ("GPU", "TPU"):
        # RuntimeError: already initialised; ValueError: no such device type.
        with contextlib.suppress(RuntimeError, ValueError):
            tf.config.set_visible_devices([], kind)
