"""Paths the file layer takes: local ones and URLs (gs://, ram://), on any OS.

file_io exposes these; they live here so that the backends (file_backends.py)
can use them without importing file_io.
"""

from __future__ import annotations

import os
import posixpath


def scheme(path: str) -> str | None:
    """The URL scheme of `path` ('gs', 'ram', ...), or None for a local path."""
    head, sep, _ = str(path).partition("://")
    return head if sep and "/" not in head else None


def is_url(path: str) -> bool:
    """True for `scheme://...` paths (gs://, ram://), False for local ones."""
    return scheme(path) is not None


def absolute(path: str) -> str:
    """A local path made absolute; a URL as it is (what run records store)."""
    return str(path) if is_url(path) else os.path.abspath(path)


def join(path: str, *parts: str) -> str:
    """Joins with '/' for URLs (on any OS) and os.path.join locally."""
    return posixpath.join(path, *parts) if is_url(path) else os.path.join(path, *parts)


def basename(path: str) -> str:
    """The last component of a local path or URL."""
    return posixpath.basename(str(path).rstrip("/"))


def dirname(path: str) -> str:
    """The parent of a local path or URL."""
    return posixpath.dirname(str(path).rstrip("/")) if is_url(path) else os.path.dirname(path)
