"""Test setup: 8 emulated CPU devices, so every test sees a multi-device mesh.

The XLA flag must be set before jax is first imported, which is why this sits
at the top of conftest.py (pytest imports it before any test module).
"""

import fcntl
import gc
import json
import os
import shutil
import sys

# Full garbage collections rare from here on, the imports included (see
# pytest_collection_finish).
gc.set_threshold(gc.get_threshold()[0], gc.get_threshold()[1], 1000)

# The tests' helper modules (tests/helpers/) import as top-level modules.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "helpers"))

from cpu_devices import xla_flags  # noqa: E402

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + xla_flags(8)).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Many tests compile the same tiny programs (the demo smoke model's init and
# train step, the eval step): a persistent compilation cache shared by the
# xdist workers and the subprocesses they start compiles each one once per
# run. Entries are keyed by the program, the compile options and the jaxlib
# version, so a hit is the same executable a fresh compile would give.
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR",
    os.path.join(os.path.dirname(os.path.dirname(__file__)), ".pytest_cache", "jax_compilation"),
)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.1")
# The verified shard counts (shard_checks.py) of the tests' builds stay in the
# repository's own cache, not in the user's ~/.cache.
os.environ.setdefault(
    "LANDMARK_JAX_CACHE_DIR",
    os.path.join(os.path.dirname(os.path.dirname(__file__)), ".pytest_cache", "landmark_jax"),
)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest  # noqa: E402
from absl import logging as absl_logging  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def _check_eight_devices():
    # jax (and TensorFlow, for the builds) are imported where a test process
    # needs them: xdist's controlling process runs no test and imports neither.
    import jax

    assert jax.device_count() == 8, (
        f"tests expect 8 emulated CPU devices, got {jax.device_count()}; "
        "was jax imported before tests/conftest.py set XLA_FLAGS?"
    )


# absl's logger (made by absl itself: a logging.getLogger("absl") before
# absl's import would make a plain Logger in its place) and its level when
# the run starts (absl's default: NOTSET).
_ABSL_LOGGER = absl_logging.get_absl_logger()
_ABSL_LEVEL = _ABSL_LOGGER.level


@pytest.fixture(autouse=True)
def _absl_logger_level_reset():
    """Each test starts with absl's logger at its level when the run started.

    A program run in-process (the notebook's cells run the train and
    evaluate code as a user's session does; a module fixture may run one)
    leaves the absl logger at WARNING for the rest of the worker, and a later
    test's caplog would miss the INFO lines it checks, depending on which
    modules its worker ran first.
    """
    _ABSL_LOGGER.setLevel(_ABSL_LEVEL)


def built_once(tmp_path_factory, worker_id: str, name: str, build):
    """`build(folder)` (its result JSON-serialisable) run once per test run.

    The two xdist workers of `make test` would each build a session fixture;
    the first to get here builds it into a folder both see, the other waits
    on the lock and reads the recorded result. Without xdist: built here.
    """
    if worker_id == "master":
        return build(tmp_path_factory.mktemp(name))
    shared = tmp_path_factory.getbasetemp().parent  # this run's, shared by its workers
    record = shared / f"{name}.json"
    with open(shared / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not record.exists():
            folder = shared / name
            shutil.rmtree(folder, ignore_errors=True)  # a build that failed part-way
            folder.mkdir()
            record.write_text(json.dumps(build(folder)))
        return json.loads(record.read_text())


@pytest.fixture(scope="session")
def demo(tmp_path_factory, worker_id):
    """A small demo data set built into two data folders.

    'full': all 10 train landmarks plus the index and test splits; 'subset':
    the same images of 6 landmarks (a stand-in for a stage change from one
    class set to another, like GLDv2-clean 81,313 -> GLDv2 203,094); 'raw':
    the GLDv2-layout CSVs and images.
    """
    return built_once(tmp_path_factory, worker_id, "demo", _build_demo)


def _build_demo(root) -> dict:
    from tfds_builds import build_tfds

    from data_pipelines import make_demo_dataset

    raw = str(root / "raw")
    make_demo_dataset.make_demo_dataset(
        raw,
        num_landmarks=10,
        num_index_landmarks=3,
        max_images_per_landmark=12,
        image_size=48,
        num_non_landmark_references=12,
        num_workers=1,
    )
    full = build_tfds(raw, str(root / "tfds"))
    # The same images of 6 landmarks, train and val only: a GLDv2-layout
    # tree of its own whose images are the full set's.
    subset_raw = root / "raw_subset"
    subset_raw.mkdir()
    os.symlink(f"{raw}/train", subset_raw / "train")
    lines = open(f"{raw}/train.csv").read().splitlines()
    landmarks = sorted({line.split(",")[-1] for line in lines[1:]})[:6]
    keep = [lines[0]] + [line for line in lines[1:] if line.split(",")[-1] in landmarks]
    (subset_raw / "train.csv").write_text("\n".join(keep) + "\n")
    clean = open(f"{raw}/train_clean.csv").read().splitlines()
    clean_keep = [clean[0]] + [line for line in clean[1:] if line.split(",")[0] in landmarks]
    (subset_raw / "train_clean.csv").write_text("\n".join(clean_keep) + "\n")
    subset = build_tfds(
        str(subset_raw),
        str(root / "tfds"),
        name="subset",
        val_fraction=0.1,
        retrieval_splits=False,
    )
    return {"full": full, "subset": subset, "raw": raw}


@pytest.fixture(scope="session")
def trained_demo(demo, tmp_path_factory, worker_id):
    """A workdir of the demo smoke config trained as it is (6 steps) on demo['full'].

    One training run shared by the extraction and evaluation tests (each
    worker its own copy); tests may write to its eval/ folder but never
    train it further. Its compiled init and train step are the ones the
    train-step benchmark's small row times (tests/experiments/test_benchmarks.py), so the
    compilation cache serves one of them to the other.
    """
    from configs_for_tests import load_config

    from landmark_jax import trainer

    def build(folder):
        config = load_config("demo", "smoke")
        config.data_dir = demo["full"]
        trainer.train_and_evaluate(config, str(folder / "run"))
        return str(folder / "run")

    shared = built_once(tmp_path_factory, worker_id, "trained_demo", build)
    workdir = str(tmp_path_factory.mktemp("trained_demo_copy") / "run")
    shutil.copytree(shared, workdir, ignore=shutil.ignore_patterns("trainer.lease"))
    return workdir


@pytest.fixture(scope="session")
def reference_losses(demo, tmp_path_factory, worker_id):
    """{step: loss} of 8 uninterrupted steps of `config_files.config_for(demo['full'])`:
    what a preempted, killed or resumed run of that config must reproduce
    (a constant learning rate, so any first k steps are the same)."""
    from configs_for_tests import config_for, losses_of

    from landmark_jax import trainer

    def build(folder):
        trainer.train_and_evaluate(config_for(demo["full"], total_steps=8), str(folder / "run"))
        return losses_of(str(folder / "run"))

    recorded = built_once(tmp_path_factory, worker_id, "reference_losses", build)
    return {int(step): loss for step, loss in recorded.items()}


@pytest.fixture(scope="session")
def revisited_data(tmp_path_factory):
    """(tiny_revisited.make_tiny_set's dict, its revisited_oxford_paris/roxford5k
    build folder, 2 shards per split, queries cropped)."""
    import tensorflow_datasets as tfds
    from tiny_revisited import make_tiny_set

    from data_pipelines import revisited_builder

    root = tmp_path_factory.mktemp("revisited")
    tiny = make_tiny_set(root / "raw")
    builder = revisited_builder.RevisitedOxfordParis(
        config="roxford5k", data_dir=str(root / "tfds"), num_workers=1
    )
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=tiny["manual_dir"], num_shards=2)
    )
    return tiny, str(builder.data_dir)


@pytest.fixture(scope="session")
def tiny_gldv2_tfrecords(tmp_path_factory):
    """(root, build folder, ids) of tiny_gldv2 with train/val/index/test built in
    4 shards per split (index: 21 images): the input pipeline tests' data."""
    from tfds_builds import build_tfds

    import tiny_gldv2

    root = str(tmp_path_factory.mktemp("gldv2"))
    ids = tiny_gldv2.make_tiny_gldv2(root, num_index=21, special=True)
    out = build_tfds(root, os.path.join(root, "tfds"), name="tiny", num_shards=4, val_fraction=0.2)
    return root, out, ids


# Where the suite's time goes, per test and per fixture (suite_profile.py).
if os.environ.get("LANDMARK_JAX_COMPILE_LOG"):
    from suite_profile import _log_compile_time, pytest_fixture_setup  # noqa: F401


# The slow modules, handed to the workers in this order: longest first (in
# seconds of a whole-suite run on 2 cores, 2026-12-07: 71, 50, 29, 69, 60,
# 50, 48, 39, 34, 28, 20, 18, 16, 13, 12, 12, 12, 10), except that the
# second and third need no demo data, so no worker waits on the first
# one's build of it. Then the other modules with end-to-end tests, then the
# unit modules.
SLOW_MODULES = (
    "test_trainer.py",
    "models/test_keras_import.py",
    "models/test_create_model.py",
    "test_evaluate.py",
    "test_training_faults.py",
    "retrieval/test_revisited.py",
    "serving/test_export.py",
    "workdir/test_run_config.py",
    "experiments/test_benchmarks.py",
    "test_cloud_paths.py",
    "test_paper_configs.py",
    "models/test_efficientnet.py",
    "serving/test_search.py",
    "models/test_conv_lowering.py",
    "test_class_counts.py",
    "data/test_input_pipeline.py",
    "models/test_dolg.py",
    "experiments/test_colab_notebook.py",
)


def pytest_collection_modifyitems(config, items):
    """The slow modules first (SLOW_MODULES), the quick unit modules last.

    `make test` hands whole modules to its workers in this order (xdist's
    loadscope with --no-loadscope-reorder; by default xdist orders modules
    by their number of tests, which handed the export module, 9 tests and
    the longest fixture, out last): a long module handed out last keeps one
    worker busy after the others have finished, so the long ones go first
    and the unit modules fill the ends.
    """
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    heavy = {
        item.module.__name__
        for item in items
        if item.get_closest_marker("e2e") or item.get_closest_marker("multiprocess")
    }

    def rank(item) -> int:
        name = os.path.relpath(str(item.path), tests_dir).replace(os.sep, "/")
        if name in SLOW_MODULES:
            return SLOW_MODULES.index(name)
        return len(SLOW_MODULES) + (item.module.__name__ not in heavy)

    items.sort(key=rank)  # stable: a module's tests keep their order


def pytest_collection_finish(session):
    """Python's full garbage collections, made rare in the test processes.

    A worker holds jax, TensorFlow, Keras and every test module: millions of
    long-lived objects that each full collection walks (about 0.3 s each,
    19 in one 82 CPU-s run of test_trainer.py and test_run_config.py: 5.8 s
    of garbage collection there). After the imports (collection) the objects
    there are moved out of the collector's view (gc.freeze), and from the
    top of this file on a full collection waits for 1,000 middle-generation
    ones instead of 10: 1.7-1.8 s of garbage collection in that run, the same
    peak memory (1.75 GB).
    Young objects are collected as before, and libraries' explicit
    gc.collect() calls still run.
    """
    gc.collect()
    gc.freeze()
