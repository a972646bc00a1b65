"""landmark_jax: JAX/Flax landmark retrieval and recognition (GLDv2)."""

import setuptools

# Ranges that resolve together on Python 3.11 (jax 0.10.x) and on Python 3.12
# (Colab / Cloud TPU VMs, jax 0.11-0.12). tensorflow-cpu is pinned to 2.20:
# scann 1.4.2 ships an op library built against the TF 2.20 ABI and
# `import scann` crashes under TF 2.21.
INSTALL_REQUIRES = [
    "absl-py>=2.1",
    "jax>=0.10.0,<0.13",
    "flax>=0.12,<0.13",
    "optax>=0.2.5,<0.3",  # optax.tree_utils.tree_norm
    "orbax-checkpoint>=0.11,<0.13",
    # The SavedModel export (serving/saved_model.py: JaxModule, ServingConfig,
    # ExportManager through jax2tf); 0.0.8 works with orbax-checkpoint 0.12 and TF 2.20.
    "orbax-export>=0.0.8,<0.1",
    "ml-collections>=1.0,<2",
    "numpy>=1.26,<3",
    # ml_dtypes 0.7.0 takes 0.7-0.85 s to import (numpy's ufunc loops registered
    # one by one; 4 ms for 0.6.0), and every process that imports jax or
    # TensorFlow pays it: each program start, each test worker and subprocess.
    # On Python 3.11 (jax 0.10.x, which asks for >=0.5.0) 0.6 is kept; 3.12's
    # newer jax gets whatever it asks for.
    "ml_dtypes>=0.5.1,<0.7; python_version < '3.12'",
    "pillow>=10",
    "tqdm>=4.66",
    "tensorflow-cpu~=2.20.0",
    "tensorboard>=2.16",  # its event protos and record writer (metric_writer.py)
    "tensorflow-datasets>=4.9,<5",
    # TFDS imports it to locate a builder's code, without declaring it.
    "importlib_resources>=6",
    "keras>=3.10,<4",
    "h5py>=3.10",
    "scann==1.4.2",
]

EMULATOR = ["gcsfs>=2024.2", "gcp-storage-emulator>=2024.8"]

BENCH = ["faiss-cpu>=1.8"]

# TFDS's Beam builds (tfds build ... --beam_pipeline_options=...); not in the
# test extra: it pins protobuf < 7 and its own pyarrow.
BEAM = ["apache-beam>=2.60"]

setuptools.setup(
    name="landmark_jax",
    version="0.1.0",
    description=__doc__,
    python_requires=">=3.11",
    packages=setuptools.find_packages(include=["landmark_jax*", "data_pipelines*"]),
    install_requires=INSTALL_REQUIRES,
    extras_require={
        # gs:// through a Cloud Storage emulator (file_io.py): gcsfs, which
        # honours STORAGE_EMULATOR_HOST, and an emulator to run locally.
        "emulator": EMULATOR,
        # The kNN benchmark's third engine (experiments/benchmarks/knn_search.py).
        "bench": BENCH,
        "beam": BEAM,
        # IPython: tests/experiments/test_colab_notebook.py parses the notebook's magics.
        "test": [
            "pytest>=8",
            "pytest-xdist>=3.5",
            "ruff>=0.6",
            "ipython>=8.18",
            *EMULATOR,
            *BENCH,
        ],
    },
)
