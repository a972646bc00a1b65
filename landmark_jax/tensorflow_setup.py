"""TensorFlow as this project uses it: tf.data, gfile and Keras on the host only.

JAX owns the accelerators. TensorFlow, imported for tf.data, gs:// file access,
ScaNN's op library or the Keras converter, would otherwise claim every GPU's
memory on its first op, so each import goes through `import_tensorflow`.
"""

from __future__ import annotations

import contextlib
from types import ModuleType


def hide_accelerators(tf: ModuleType) -> None:
    """Makes TensorFlow's GPUs and TPUs invisible to it (a no-op once TF's
    devices are initialised, or where there are none)."""
    for kind in ("GPU", "TPU"):
        # RuntimeError: already initialised; ValueError: no such device type.
        with contextlib.suppress(RuntimeError, ValueError):
            tf.config.set_visible_devices([], kind)


def import_tensorflow() -> ModuleType:
    """`import tensorflow`, with the accelerators hidden from it."""
    import tensorflow as tf

    hide_accelerators(tf)
    return tf
