"""Building beside a previous build and swapping it in, under a lease.

build_dataset's rebuild machinery: the lease that lets one build of a config
run at a time (`<name>/<config>.build.lease`), the deletion of the temporary
`incomplete.*` folders a build that did not finish left, and a rebuild staged
in a temporary folder beside the previous build, which is moved aside, replaced
and deleted only once the new one is complete (see build_dataset's docstring).
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable

from landmark_jax.data import data_format
from landmark_jax.runtime import file_io, file_lease

# What a staged rebuild and a replaced build are called in the config's folder.
_REBUILD_PREFIX = f"{data_format.TEMPORARY_PREFIX}rebuild_"
_PREVIOUS_INFIX = ".previous_"
# The files that make a folder a TFDS build (data_format.find_build): moved
# last, so that a build moved file by file reads as one only once complete.
_BUILD_MARKERS = ("dataset_info.json", "features.json")
# file_lease's wait for a second taker of a lease in a bucket (tests shorten it).
LEASE_SETTLE_SECONDS = 2.0


def lease_path(final: str) -> str:
    """`<data_dir>/<name>/<config>.build.lease` for the build `<...>/<config>/<version>`:
    beside the config's folder, which then holds builds and their temporaries only."""
    config_dir = file_io.dirname(final)
    return file_io.join(file_io.dirname(config_dir), f"{file_io.basename(config_dir)}.build.lease")


def build_lease(dataset: str, final: str) -> file_lease.Lease:
    """The held lease of a build of one config (a context manager releasing it).

    Raises:
      file_lease.LeaseHeld: another build of it is running, naming it.
    """
    lease = file_lease.Lease(lease_path(final), settle_seconds=LEASE_SETTLE_SECONDS)
    try:
        return lease.acquire()
    except file_lease.LeaseHeld as e:
        raise file_lease.LeaseHeld(
            f"another build of {dataset} into {file_io.dirname(final)} is running ({e}); "
            "wait for it to finish, then rerun (an existing build is reused, or rebuilt "
            "with --overwrite)"
        ) from None


def tidy_when_idle(dataset: str, final: str) -> None:
    """remove_unfinished, for a run that reuses a build, unless a build of
    that config is running (then its temporaries are in use)."""
    try:
        with build_lease(dataset, final):
            remove_unfinished(file_io.dirname(final))
    except file_lease.LeaseHeld:
        pass


def remove_unfinished(config_dir: str) -> None:
    """Deletes the `incomplete.*` folders of a config: with its build lease held,
    they are what a build that did not finish left (TFDS's temporaries, and
    our staged rebuilds). A previous build left aside by a rebuild that was
    killed while swapping is the user's data: named, never deleted."""
    for name in file_io.listdir(config_dir):
        path = file_io.join(config_dir, name)
        if data_format.is_temporary(path) and file_io.isdir(path):
            logging.warning(
                "%s: deleting the temporary folder of a build that did not finish "
                "(killed, or its machine lost; no other build of this config holds the lease)",
                path,
            )
            file_io.rmtree(path)
        elif _PREVIOUS_INFIX in name:
            logging.warning(
                "%s: a previous build that a killed rebuild moved aside; kept. Move it back "
                "to %s if that folder is missing",
                path,
                name.split(_PREVIOUS_INFIX)[0],
            )


def rebuild_beside(final: str, build_into: Callable[[str], str]) -> None:
    """Builds again into a temporary folder beside `final`, then swaps it in.

    The previous build stays untouched until the new one is complete; if
    building fails, the temporary folder is deleted and nothing else changed.

    Args:
      final: the build's folder, `<data_dir>/<name>/<config>/<version>`.
      build_into: builds the data set under the data dir it is given (the
        temporary folder) and returns the new build's folder there.
    """
    config_dir, version = file_io.dirname(final), file_io.basename(final)
    token = uuid.uuid4().hex[:8]
    staging = file_io.join(config_dir, f"{_REBUILD_PREFIX}{token}")
    try:
        staged = build_into(staging)
        previous = file_io.join(config_dir, f"{version}{_PREVIOUS_INFIX}{token}")
        _move_build(final, previous)
        try:
            _move_build(staged, final)
        except BaseException:
            # `final` holds only files of the new build: the previous one goes back.
            file_io.rmtree(final)
            _move_build(previous, final)
            raise
        file_io.rmtree(previous)
        logging.info(
            "%s: rebuilt; the previous build was deleted once this one was in place", final
        )
    finally:
        file_io.rmtree(staging)


def _move_build(source: str, target: str) -> None:
    """Moves a build folder to `target`; in a bucket its metadata files go
    last, so that `target` reads as a build only once it is complete."""
    file_io.move_folder(source, target, last=_BUILD_MARKERS)
