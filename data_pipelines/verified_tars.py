"""GLDv2's tar shards, verified: the digest of an md5 file, a file's md5, and an
extraction that refuses members that would land outside its folder.

download_gldv2.py checks every tar with these before it extracts it.
"""

from __future__ import annotations

import hashlib
import os
import re
import tarfile

_MD5 = re.compile(r"^[0-9a-f]{32}$")
_CHUNK = 1 << 20


def read_md5(text: str, where: str) -> str:
    """Reads the digest from md5sum output (`<32 hex>  images_NNN.tar`).

    Args:
      text: the md5 file's contents.
      where: the file or URL it came from, for the error message.

    Returns:
      The digest, lower case.

    Raises:
      ValueError: the first token is not 32 hex characters.
    """
    tokens = text.split()
    token = tokens[0].lower() if tokens else ""
    if not _MD5.match(token):
        raise ValueError(f"{where}: expected an md5 digest (32 hex characters), got {token!r}")
    return token


def file_md5(path: str) -> str:
    """Returns the hex md5 digest of a local file."""
    digest = hashlib.md5()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def extract_tar(tar_path: str, dest_dir: str) -> int:
    """Extracts the regular files of a tar into dest_dir.

    Every member name is checked before anything is written, so a hostile
    tar leaves nothing behind. Links and devices are skipped: the release
    only holds JPEGs, and a link could point outside dest_dir.

    Args:
      tar_path: the tar file.
      dest_dir: the folder to extract into (created if needed).

    Returns:
      The number of files written.

    Raises:
      ValueError: a member has an absolute path or a `..` component; the
        message names the tar and the member.
    """
    with tarfile.open(tar_path) as tar:
        members = tar.getmembers()
        for member in members:
            parts = member.name.replace("\\", "/").split("/")
            if member.name.startswith(("/", "\\")) or os.path.isabs(member.name) or ".." in parts:
                raise ValueError(f"{tar_path}: refusing unsafe member path {member.name!r}")
        count = 0
        for member in members:
            if not member.isfile():
                continue
            dest = os.path.join(dest_dir, os.path.normpath(member.name))
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            source = tar.extractfile(member)
            assert source is not None  # isfile() members always have data
            with source, open(dest, "wb") as out:
                while chunk := source.read(_CHUNK):
                    out.write(chunk)
            count += 1
    return count
