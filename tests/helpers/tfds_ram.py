"""TensorFlow's in-memory ram:// filesystem for TensorFlow Datasets, in tests.

TFDS reaches files through etils.epath, which knows gs://, s3://, az:// and
hf:// only: `tfds.builder(..., data_dir="ram://...")` and
`tfds.builder_from_directory("ram://...")` fail with KeyError 'ram://'. For
gs:// (with TensorFlow installed) epath uses its TensorFlow backend, i.e.
tf.io.gfile, the code that ram:// goes through too. `register()` makes
epath take ram:// paths through that same backend, so a test can build and
read TFDS data sets on a non-local filesystem the way they are built and read
on a bucket.

TensorFlow 2.20's ram:// lacks three things a bucket has, which epath's
TensorFlow backend relies on, so the backend registered here adds them (as
landmark_jax.runtime.file_io does for its own calls): recursive deletion, renaming a
folder (TFDS builds into `incomplete.*` and renames it), and replacing a file
that is opened for writing (ram:// appends to it). Listing a folder lists
siblings that share its name as a prefix, so listdir goes through a glob.

Only the public registry of etils (epath.register_path_cls) is changed; the
path class reuses PosixGPath, the class of gs:// paths, overriding how it
maps `ram://` onto its parts and which backend it uses.
"""

from __future__ import annotations

import functools

from etils import epath
from etils.epath import backend as backend_lib
from etils.epath import gpath

from landmark_jax.runtime import file_io

_SCHEME = "ram"


class _RamBackend(backend_lib._TfBackend):
    """epath's tf.io.gfile backend, with a bucket's semantics on ram://."""

    def open(self, path, mode):
        if "w" in mode and self.gfile.exists(path):
            self.gfile.remove(path)  # ram:// appends to an existing file
        return super().open(path, mode)

    def listdir(self, path):
        return file_io.listdir(str(path))

    def rmtree(self, path):
        if not self.gfile.exists(path):
            raise FileNotFoundError(f"{path} not found")
        file_io.rmtree(str(path))

    def rename(self, path, dst):
        path, dst = str(path).rstrip("/"), str(dst).rstrip("/")
        if not self.gfile.isdir(path):
            super().rename(path, dst)
            return
        if self.gfile.exists(dst):
            raise FileExistsError(f"{dst} exists")
        # A folder: each file moved, as a bucket moves the objects of a prefix.
        self.gfile.makedirs(dst)
        for child in self.gfile.glob(f"{path}/*"):
            self.rename(child, dst + child[len(path) :])
        self.gfile.remove(path)

    def replace(self, path, dst):
        if self.gfile.exists(dst) and not self.gfile.isdir(dst):
            self.gfile.remove(dst)
        self.rename(path, dst)


_BACKEND = _RamBackend()


class RamPath(gpath.PosixGPath):
    """An epath path on ram://, stored as parts ('/', 'ram', ...) as gs:// is."""

    def __new__(cls, *parts):
        full = "/".join(str(p) for p in parts)
        if full.startswith(f"{_SCHEME}://"):
            return super().__new__(cls, f"/{_SCHEME}/" + full[len(_SCHEME) + 3 :])
        return super().__new__(cls, *parts)

    @property
    def _uri_scheme(self):
        return _SCHEME if self.parts[:2] == ("/", _SCHEME) else None

    @property
    def _backend(self):
        return _BACKEND


@functools.cache
def register() -> None:
    """Makes epath (and so TFDS) open ram:// paths; idempotent.

    Raises:
      AssertionError: this etils no longer maps ram:// paths as expected
        (its private path layout changed): the helper needs updating.
    """
    epath.register_path_cls(f"{_SCHEME}://")(RamPath)
    probe = epath.Path(f"{_SCHEME}://probe/a")
    assert isinstance(probe, RamPath) and str(probe / "b") == f"{_SCHEME}://probe/a/b", probe
