"""The programs' shared start-up (runtime/program_start.py): garbage collection."""

import json
import subprocess
import sys

from configs_for_tests import REPO

# In a fresh interpreter, as a program starts: in a test worker the full
# collection it makes would first finalise every earlier test's garbage
# (failed runs' tracebacks, their streams), and its gc.freeze() would stay.
PROGRAM = """
import gc, json
from landmark_jax.runtime import program_start
gc.set_threshold(700, 10, 10)  # CPython's defaults
frozen = gc.get_freeze_count()
alive = [[] for _ in range(1000)]  # container objects the collector tracks
watched = any(o is alive[0] for o in gc.get_objects())
program_start.collect_garbage_rarely()
still_watched = any(o is alive[0] for o in gc.get_objects())
print(json.dumps([gc.get_threshold(), gc.get_freeze_count() - frozen, watched, still_watched]))
"""


def test_programs_collect_garbage_rarely():
    """The objects alive at start-up leave the collector's view and a full
    collection waits for 1,000 middle-generation ones (10 by default)."""
    result = subprocess.run(
        [sys.executable, "-c", PROGRAM], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr[-3000:]
    threshold, newly_frozen, watched, still_watched = json.loads(result.stdout)
    assert threshold == [700, 10, 1000]
    assert newly_frozen >= 1000 and watched and not still_watched
