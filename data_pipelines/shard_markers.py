"""The finished-shard markers of download_gldv2: `images_NNN.done`, written
once a tar is verified and extracted, recording its md5 and its size and mtime
when it was hashed, and whether a marker still vouches for its tar (one stat,
not a hash).
"""

from __future__ import annotations

import json
import os

from data_pipelines.verified_tars import file_md5, read_md5

# The marker's format; a marker without it was written before markers recorded
# the tar's size and mtime (a bare `<md5>  images_NNN.tar` line).
_MARKER_FORMAT = 2


def write_marker(done: str, tar_name: str, md5: str, stat: os.stat_result) -> None:
    """Records a verified, extracted tar: its md5, and its size and mtime when hashed.

    Written to a temporary file and renamed, so a crash leaves the old marker
    or the new one, never half of one.

    Args:
      done: the marker's path (DIR/tars/<split>/images_NNN.done).
      tar_name: the tar's file name, for a reader of the marker.
      md5: the digest the tar was found to have.
      stat: the tar's os.stat taken before it was hashed, so that a change
        during hashing shows as an mtime the marker does not record.
    """
    record = {
        "format": _MARKER_FORMAT,
        "tar": tar_name,
        "md5": md5,
        "size": stat.st_size,
        "mtime_ns": stat.st_mtime_ns,
    }
    with open(done + ".tmp", "w") as f:
        json.dump(record, f)
        f.write("\n")
    os.replace(done + ".tmp", done)


def read_marker(done: str) -> dict:
    """Reads a shard's marker.

    Args:
      done: the marker's path.

    Returns:
      A dict with "md5" and, for a marker written since markers record
      them, "size" and "mtime_ns" (ints); an older marker's dict has "md5" only.

    Raises:
      ValueError: the marker is neither format (empty, truncated, edited);
        the message says what is wrong.
    """
    with open(done) as f:
        text = f.read()
    if not text.strip():
        raise ValueError("empty")
    if not text.lstrip().startswith("{"):
        # An older version's marker: md5sum output for the tar.
        return {"md5": read_md5(text, "neither JSON nor md5sum output")}
    try:
        record = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"not JSON ({e})") from e
    fields = {"md5": str, "size": int, "mtime_ns": int}
    if not isinstance(record, dict) or any(
        not isinstance(record.get(key), kind) for key, kind in fields.items()
    ):
        raise ValueError(f"expected md5, size and mtime_ns, got {text.strip()[:200]!r}")
    return record


def why_untrusted(done: str, tar_path: str, expected: str, md5_path: str) -> str | None:
    """Why a finished shard's marker does not vouch for its tar as it is now.

    Trusting a marker costs one stat: the tar must still have the size and
    mtime it had when it was hashed, and the marker must record the md5 the
    md5 file asks for. A change that keeps both size and mtime (bit rot, a
    copy that sets mtimes) is for --verify to find.

    Args:
      done: the shard's marker, which exists.
      tar_path: the shard's tar, which exists.
      expected: the md5 that md5_path gives.
      md5_path: the shard's md5 file, for the message.

    Returns:
      None if the marker can be trusted, else a log line naming the file at
      fault and what differs.
    """
    try:
        record = read_marker(done)
    except (OSError, ValueError) as e:
        return f"{done}: unreadable marker ({e})"
    if "size" not in record:
        return f"{done}: written by an older version, which recorded no size or mtime"
    if record["md5"] != expected:
        return f"{done}: records md5 {record['md5']}, but {md5_path} says {expected}"
    stat = os.stat(tar_path)
    if stat.st_size != record["size"]:
        return f"{tar_path}: {stat.st_size} bytes, but {record['size']} when it was verified"
    if stat.st_mtime_ns != record["mtime_ns"]:
        return f"{tar_path}: modified since it was verified (mtime differs from {done})"
    return None


def stat_and_md5(path: str) -> tuple[os.stat_result, str]:
    """Returns a file's os.stat, taken first, and its md5 digest."""
    stat = os.stat(path)
    return stat, file_md5(path)
