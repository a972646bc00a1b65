"""The filesystems behind file_io: local paths, TensorFlow's (gs://, ram://), and
gcsfs against the Cloud Storage emulator for the tests.

Each backend has the same small set of methods (open, exists, isdir, isfile,
makedirs, listdir, glob, remove, rmtree, rename, fingerprint, ...); file_io
picks one per path and is the only module that uses them.
"""

from __future__ import annotations

import glob as glob_lib
import os
import shutil

from landmark_jax.runtime.file_paths import basename, join, scheme


class LocalFiles:
    """Local paths: Python's own functions (no TensorFlow in worker processes)."""

    def open(self, path, mode):
        return open(path, mode, encoding=None if "b" in mode else "utf-8")

    def exists(self, path):
        return os.path.exists(path)

    def isdir(self, path):
        return os.path.isdir(path)

    def isfile(self, path):
        return os.path.isfile(path)

    def makedirs(self, path):
        os.makedirs(path, exist_ok=True)

    def listdir(self, path):
        return sorted(os.listdir(path))

    def glob(self, pattern):
        return sorted(glob_lib.glob(pattern))

    def remove(self, path):
        os.remove(path)

    def rmtree(self, path):
        shutil.rmtree(path)

    def rename(self, source, target):
        os.replace(source, target)

    def fingerprint(self, path):
        stat = os.stat(path)
        return f"{stat.st_size}:{stat.st_mtime_ns}"


class TensorFlowFiles:
    """tf.io.gfile: gs://, ram:// and TensorFlow's plugins."""

    def __init__(self):
        # Imported on first use: processes that touch only local files (the
        # builders' workers, the config-only CLIs) need no TensorFlow.
        import tensorflow as tf

        self.gfile = tf.io.gfile
        self.not_found = tf.errors.NotFoundError

    def open(self, path, mode):
        if "w" in mode and scheme(path) == "ram" and self.gfile.exists(path):
            # TF 2.20's ram:// appends when an existing file is opened for
            # writing; every other filesystem replaces it.
            self.gfile.remove(path)
        return self.gfile.GFile(path, mode)

    def exists(self, path):
        return self.gfile.exists(path)

    def isdir(self, path):
        return self.gfile.isdir(path)

    def isfile(self, path):
        try:
            return not self.gfile.stat(path).is_directory
        except self.not_found:
            return False

    def makedirs(self, path):
        self.gfile.makedirs(path)

    def listdir(self, path):
        if scheme(path) == "ram":
            # TF 2.20's ram:// lists siblings that share the folder's name as
            # a prefix (train.csv beside train/); a glob does not.
            return sorted(basename(p) for p in self.gfile.glob(join(path, "*")))
        return sorted(name.rstrip("/") for name in self.gfile.listdir(path))

    def glob(self, pattern):
        return sorted(self.gfile.glob(pattern))

    def remove(self, path):
        self.gfile.remove(path)

    def rmtree(self, path):
        if scheme(path) != "ram":
            self.gfile.rmtree(path)
            return
        # TF 2.20's ram:// cannot delete recursively: each file, then the
        # folder's own entry.
        for child in self.gfile.glob(join(path, "*")):
            if self.gfile.isdir(child):
                self.rmtree(child)
            else:
                self.gfile.remove(child)
        if self.gfile.exists(path):
            self.gfile.remove(path)

    def rename(self, source, target):
        self.gfile.rename(source, target, overwrite=True)

    def fingerprint(self, path):
        stat = self.gfile.stat(path)
        return f"{stat.length}:{stat.mtime_nsec}"


class EmulatedCloudStorage:
    """gcsfs against the Cloud Storage emulator at $STORAGE_EMULATOR_HOST."""

    def __init__(self):
        import gcsfs

        # No listing cache: Orbax's TensorStore writes behind gcsfs's back.
        self.fs = gcsfs.GCSFileSystem(token="anon", use_listings_cache=False)

    def open(self, path, mode):
        return self.fs.open(path, mode)

    def exists(self, path):
        return self.fs.exists(path)

    def isdir(self, path):
        return self.fs.isdir(path)

    def isfile(self, path):
        return self.fs.isfile(path)

    def makedirs(self, path):
        # Object stores have no folders: an object's name creates its prefix.
        pass

    def listdir(self, path):
        return sorted(basename(p) for p in self.fs.ls(path, detail=False))

    def glob(self, pattern):
        return sorted("gs://" + p for p in self.fs.glob(pattern))

    def remove(self, path):
        self.fs.rm_file(path)

    def rmtree(self, path):
        self.fs.rm(path, recursive=True)

    def rename(self, source, target):
        self.fs.mv(source, target)

    def fingerprint(self, path):
        info = self.fs.info(path)
        return f"{info['size']}:{info.get('generation') or info.get('updated')}"
