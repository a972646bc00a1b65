"""The programs' shared start-up (runtime/program_start.py): garbage collection."""

import gc

from landmark_jax.runtime import program_start


def test_programs_collect_garbage_rarely():
    """The objects alive at start-up leave the collector's view and a full
    collection waits for 1,000 middle-generation ones (10 by default)."""
    before = gc.get_threshold()
    try:
        gc.set_threshold(700, 10, 10)
        frozen = gc.get_freeze_count()
        alive = [[] for _ in range(1000)]  # container objects the collector tracks
        program_start.collect_garbage_rarely()
        assert gc.get_threshold() == (700, 10, 1000)
        assert gc.get_freeze_count() >= frozen + len(alive)
    finally:
        gc.set_threshold(*before)
