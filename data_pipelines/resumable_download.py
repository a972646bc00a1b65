"""Resumable HTTP downloads for download_gldv2: a file fetched into `<dest>.part`
with Range requests that continue where an interrupted transfer (or run)
stopped, retried a few times before it counts as failed.
"""

from __future__ import annotations

import os
import time
import urllib.error
import urllib.request

from absl import logging

# Seconds to wait before retrying a failed transfer; tests set it to 0.
RETRY_DELAY_S = 2.0
_TIMEOUT_S = 60
_CHUNK = 1 << 20


class DownloadError(RuntimeError):
    """A file could not be downloaded or verified."""


class _Interrupted(OSError):
    """A transfer stopped early; the .part file is kept to resume from."""


def _fetch(url: str, part: str) -> int:
    """Downloads url into part, resuming from part's size; returns bytes fetched."""
    offset = os.path.getsize(part) if os.path.exists(part) else 0
    request = urllib.request.Request(url)
    if offset:
        request.add_header("Range", f"bytes={offset}-")
    try:
        response = urllib.request.urlopen(request, timeout=_TIMEOUT_S)
    except urllib.error.HTTPError as e:
        if e.code == 416 and offset:
            # Nothing after `offset`: the part is complete (or too long), and
            # the md5 check that follows tells which.
            return 0
        raise
    with response:
        mode = "ab"
        start = response.headers.get("Content-Range", "")
        if response.status != 206 or not start.startswith(f"bytes {offset}-"):
            # The server sent the whole file (or another range): start over.
            mode, offset = "wb", 0
        expected = response.headers.get("Content-Length")
        received = 0
        with open(part, mode) as out:
            try:
                while chunk := response.read(_CHUNK):
                    out.write(chunk)
                    received += len(chunk)
            except Exception as e:  # Any mid-read failure leaves a resumable part.
                raise _Interrupted(
                    f"{url}: transfer interrupted after {received} bytes: {e}"
                ) from e
        # http.client returns b"" rather than raising when the connection
        # closes early, so a short body is only visible by counting.
        if expected is not None and received < int(expected):
            raise _Interrupted(f"{url}: connection closed after {received} of {expected} bytes")
    return received


def download(url: str, dest: str, retries: int) -> int:
    """Fetches url to dest.part with up to `retries` attempts; returns bytes fetched.

    The .part file is kept between attempts (and runs) so each retry resumes.
    """
    part = dest + ".part"
    fetched = 0
    for attempt in range(1, retries + 1):
        try:
            fetched += _fetch(url, part)
            return fetched
        except urllib.error.HTTPError as e:
            if 400 <= e.code < 500:
                # Retrying a missing file or a refused request cannot help.
                raise DownloadError(f"{url}: HTTP {e.code} {e.reason}") from e
            error: Exception = e
        except OSError as e:
            error = e
        if attempt == retries:
            raise DownloadError(f"{url}: failed after {retries} attempts: {error}") from error
        logging.warning("%s: attempt %d of %d failed (%s); retrying", url, attempt, retries, error)
        time.sleep(RETRY_DELAY_S)
    raise AssertionError("unreachable")
