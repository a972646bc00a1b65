"""Every file the project reads or writes goes through here: local, gs://, ram://.

Local paths go through Python's own file functions; URLs through TensorFlow's filesystems
(`tf.io.gfile`), the ones tf.data reads TFRecords through: Cloud Storage (`gs://bucket/...`,
with the VM's or `gcloud auth` credentials), TensorFlow's in-memory `ram://` and any filesystem
a TensorFlow plugin registers. So a workdir or data folder in a bucket works like a local one,
and nothing lands in a local folder named `gs:` by accident.

Two exceptions, both by necessity:
- Orbax writes checkpoint arrays through TensorStore, which takes local paths and `gs://` only;
  `checkpoint_path` turns a path into what Orbax takes and names the path it cannot.
- TensorFlow's GCS client has no setting for another endpoint, so it cannot reach a Cloud
  Storage emulator. With `STORAGE_EMULATOR_HOST` set (the variable the Cloud Storage clients
  honour), `gs://` paths go through gcsfs, which reaches the emulator; Orbax then needs
  `EPATH_USE_TF=0` and `TENSORSTORE_GCS_HTTP_URL` set to the same address (the README's "Cloud
  paths" section, and tests/test_cloud_paths.py, which runs on one). TensorFlow's readers
  (tf.data) still use TensorFlow's client, so data folders cannot live on an emulator.
"""

from __future__ import annotations

import errno
import functools
import io
import json
import os
import re
import shutil
import uuid
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from typing import IO, Any

import numpy as np

from landmark_jax.runtime import file_backends

# The path grammar, part of this module's interface.
from landmark_jax.runtime.file_paths import absolute, basename, dirname, is_url, join, scheme  # noqa: F401

EMULATOR_ENV = "STORAGE_EMULATOR_HOST"
# Schemes Orbax (TensorStore) can write checkpoints to, besides local paths.
CHECKPOINT_SCHEMES = ("gs",)


# --- Backends -----------------------------------------------------------------


_BACKENDS = {
    "local": file_backends.LocalFiles,
    "tensorflow": file_backends.TensorFlowFiles,
    "emulator": file_backends.EmulatedCloudStorage,
}


@functools.cache
def _backend_named(name: str):
    return _BACKENDS[name]()


def _backend(path: str):
    kind = scheme(path)
    if kind is None:
        return _backend_named("local")
    if kind == "gs" and os.environ.get(EMULATOR_ENV):
        return _backend_named("emulator")
    return _backend_named("tensorflow")


# --- Queries ------------------------------------------------------------------


def exists(path: str) -> bool:
    """True if a file or folder exists at `path`."""
    return _backend(path).exists(path)


def isdir(path: str) -> bool:
    """True if `path` is a folder (or, in a bucket, a prefix with objects)."""
    return _backend(path).isdir(path)


def isfile(path: str) -> bool:
    """True if `path` exists and is not a folder."""
    return _backend(path).isfile(path)


def listdir(path: str) -> list[str]:
    """The names (not paths) in a folder, sorted; [] for a missing folder."""
    if not exists(path):
        return []
    return _backend(path).listdir(path)


def fingerprint(path: str) -> str:
    """What changes when a file is rewritten: its size and modification time
    (a bucket object's generation or update time), as one string.

    Raises:
      OSError: it cannot be looked at (no such file, no permission), with the path.
    """
    try:
        return _backend(path).fingerprint(path)
    except Exception as e:
        raise _named(e, path, "look at it") from e


def glob(pattern: str) -> list[str]:
    """The paths matching a glob, sorted."""
    return _backend(pattern).glob(pattern)


# --- Reading and writing ------------------------------------------------------


def _named(error: Exception, path: str, doing: str) -> Exception:
    """The filesystem's error, with the path in its message if it lacks one."""
    if isinstance(error, OSError | ValueError) and str(path) in str(error):
        return error
    if isinstance(error, FileNotFoundError):
        return FileNotFoundError(f"{path}: no such file ({error})")
    # tf.errors.OpError, gcsfs/aiohttp errors, PermissionError, disk full...
    return OSError(f"{path}: cannot {doing}: {error}")


@contextmanager
def open_file(path: str, mode: str = "r") -> Iterator[IO[Any]]:
    """Opens a file for reading or writing ('r', 'rb', 'w', 'wb').

    Writing creates the parent folder. Opening errors name the path; errors
    raised by the caller's own code inside the `with` pass through as they are.

    Raises:
      FileNotFoundError: reading a file that does not exist.
      OSError: the path cannot be opened (no permission, no such bucket),
        with the path and the filesystem's reason.
      ValueError: an append or update mode, which object stores do not have.
    """
    if "a" in mode or "+" in mode:
        raise ValueError(f"{path}: mode {mode!r}: object stores cannot append; rewrite the file")
    if "r" in mode and not isfile(path):
        raise FileNotFoundError(f"{path}: no such file")
    if "w" in mode:
        makedirs(dirname(path))
    try:
        f = _backend(path).open(path, mode)
    except Exception as e:
        raise _named(e, path, "open it") from e
    with f:
        yield f


def read_bytes(path: str) -> bytes:
    """A file's contents.

    Raises:
      FileNotFoundError: no such file.
      OSError: it cannot be read, with the path.
    """
    with open_file(path, "rb") as f:
        try:
            return f.read()
        except Exception as e:
            raise _named(e, path, "read it") from e


def read_text(path: str) -> str:
    """A UTF-8 file's contents (a BOM, as spreadsheets save, removed); a byte
    that is not UTF-8 is a ValueError naming its line and offset."""
    data = read_bytes(path)
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        at = f"byte {data[e.start]:#04x} at offset {e.start}"
        raise ValueError(f"{path}:{line}: {at} is not UTF-8; save it as UTF-8") from None


def _write_whole(path: str, data: bytes, named: str) -> None:
    try:
        with open_file(path, "wb") as f:
            f.write(data)
    except Exception as e:  # an upload can fail at close, too
        raise _named(e, named, "write it") from e


def write_bytes(path: str, data: bytes) -> None:
    """Writes a whole file so that readers never see half of it.

    A local file is written next to its target and renamed over it; an
    object in a bucket is replaced whole by its upload already.

    Raises:
      OSError: it cannot be written (no permission, no such bucket, a full
        disk), with the path.
    """
    if is_url(path):
        _write_whole(path, data, path)
        return
    partial = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        _write_whole(partial, data, path)
        rename(partial, path)
    finally:
        if os.path.exists(partial):
            os.remove(partial)


def write_text(path: str, text: str) -> None:
    """Writes a whole UTF-8 text file (see write_bytes)."""
    write_bytes(path, text.encode("utf-8"))


def can_append(path: str) -> bool:
    """True where `append_bytes` works: local files (object stores cannot append)."""
    return not is_url(path)


def append_bytes(path: str, data: bytes) -> None:
    """Appends to a local file (creating it and its folder), flushed to the OS.

    A crash can leave the last append cut short; readers of such a file
    must expect a partial last line.

    Raises:
      ValueError: `path` is a URL (see can_append).
      OSError: it cannot be written, with the path.
    """
    if not can_append(path):
        raise ValueError(f"{path}: object stores cannot append; write whole objects")
    makedirs(dirname(path))
    try:
        with open(path, "ab") as f:
            f.write(data)
    except Exception as e:
        raise _named(e, path, "append to it") from e


def read_json(path: str) -> Any:
    """A JSON file's contents.

    Raises:
      FileNotFoundError: no such file.
      ValueError: the file is not JSON, with the path.
    """
    text = read_text(path)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e


def write_json(path: str, value: Any) -> None:
    """Writes `value` as indented JSON with sorted keys (see write_bytes)."""
    write_text(path, json.dumps(value, indent=2, sort_keys=True) + "\n")


def save_npz(path: str, **arrays: Any) -> None:
    """np.savez to any path (see write_bytes)."""
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    write_bytes(path, buffer.getvalue())


def load_npz(path: str) -> dict[str, np.ndarray]:
    """The arrays of an .npz written by save_npz."""
    with np.load(io.BytesIO(read_bytes(path))) as f:
        return {key: f[key] for key in f.files}


# --- Folders ------------------------------------------------------------------


def makedirs(path: str) -> None:
    """Creates a folder and its parents; a no-op if it exists.

    Raises:
      OSError: it cannot be created, with the path.
    """
    if not path:
        return
    try:
        _backend(path).makedirs(path)
    except Exception as e:
        raise OSError(f"{path}: cannot create the folder: {e}") from e


def remove(path: str) -> None:
    """Deletes a file."""
    _backend(path).remove(path)


def rename(source: str, target: str) -> None:
    """Moves a file, replacing `target` (in a bucket: a copy, then a delete)."""
    _backend(source).rename(source, target)


def move_folder(source: str, target: str, last: Collection[str] = ()) -> None:
    """Moves a folder and everything in it to `target`, which must not exist.

    Local: one rename. In a bucket (no folders to rename): every object is
    copied, the files named in `last` after the others (e.g. the metadata
    that makes a folder read as complete), and `source` is removed only once
    all of them are in place, so a move cut short leaves the source whole.

    Raises:
      FileExistsError: `target` exists (nothing is moved).
      OSError: a copy failed, naming the file (the source is left as it was).
    """
    # By listing the parent: TF's ram:// says a path exists when a sibling
    # merely starts with its name (1.0.0 beside 1.0.0.previous_x).
    parent = dirname(target.rstrip("/"))
    if isdir(parent) and basename(target.rstrip("/")) in listdir(parent):
        raise FileExistsError(f"{target}: exists; not moving {source} over it")
    if scheme(source) is None and scheme(target) is None:
        os.rename(source, target)
        return
    names = sorted((name.rstrip("/") for name in listdir(source)), key=lambda n: n in last)
    for name in names:
        child = join(source, name)
        if isdir(child):
            move_folder(child, join(target, name), last)
        else:
            write_bytes(join(target, name), read_bytes(child))
    rmtree(source)


def rmtree(path: str) -> None:
    """Deletes a folder and everything in it; a no-op if it does not exist."""
    if exists(path):
        _backend(path).rmtree(path)


# --- Disk space ---------------------------------------------------------------

_NO_SPACE = re.compile(r"No space left on device|os_error_code='28'|ENOSPC")


def free_bytes(path: str) -> int | None:
    """Bytes free on the local filesystem that holds (or will hold) `path`;
    None for a URL (a bucket has no such limit)."""
    if is_url(path):
        return None
    existing = os.path.abspath(path)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    return shutil.disk_usage(existing).free


def no_space_left(error: BaseException) -> str | None:
    """What a disk-full error says (the file and bytes it failed on), or None.

    Looks through the chain of causes: TensorStore reports ENOSPC as a
    ValueError('RESOURCE_EXHAUSTED: ... Failed to write N bytes to file ...:
    No space left on device'), wrapped in Orbax's own errors.
    """
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if getattr(error, "errno", None) == errno.ENOSPC or _NO_SPACE.search(str(error)):
            text = str(error)
            written = re.search(r'Failed writing: "([^"]+)"', text)
            size = re.search(r"Failed to write (\d+) bytes", text)
            file = getattr(error, "filename", None) or (written.group(1) if written else None)
            parts = [f"writing {file}" if file else "writing"]
            if size:
                parts.append(f"{int(size.group(1)):,} bytes did not fit")
            return ": ".join(parts)
        error = error.__cause__ or error.__context__
    return None


# --- Orbax --------------------------------------------------------------------


def checkpoint_path(path: str) -> str:
    """The form of a folder that Orbax takes: absolute if local, gs:// as is.

    Raises:
      ValueError: a URL scheme that Orbax's TensorStore cannot write (ram://
        and others), naming the path.
    """
    kind = scheme(path)
    if kind is None:
        return absolute(path)
    if kind not in CHECKPOINT_SCHEMES:
        raise ValueError(
            f"{path}: Orbax checkpoints go to a local folder or gs:// only "
            f"(TensorStore cannot write {kind}://); put the workdir there"
        )
    return str(path).rstrip("/")
