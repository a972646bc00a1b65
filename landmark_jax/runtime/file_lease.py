"""Exclusive leases on files, local or in a bucket, that survive their holder's crash.

One use: one trainer per workdir (`workdir_lease`).

- Local paths: `fcntl.flock` on the lease file. The kernel drops the lock
  when its holder dies, however it dies, so a crashed holder never blocks
  the next run; the file's text names the holder for the error message.
- URLs (gs://; ram:// in tests): object stores have no locks. The holder
  writes a record (host, pid, a random token, a heartbeat count), waits a
  settle time, and holds the lease if its token is still the one stored;
  a background thread rewrites the record with the next count every
  `heartbeat_seconds`. The holder checks its token again before each
  checkpoint (`verify`), so a run that lost its lease stops before it
  writes over another's.

Whether a holder is alive is judged on one clock, the reader's own: the
clocks of two machines may disagree by minutes, so a time one of them wrote
is never compared with the other's. A record of another machine is watched
(read again and again) for up to `stale_seconds` of the reader's monotonic
clock: if it changes, its holder is alive and the lease is refused; if it
stays the same that long (a holder that was killed, or whose machine was
lost), it is taken over. A record of this machine needs no watching: a holder
whose process is gone is taken over at once, and its wall-clock heartbeat is
on the reader's own clock.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator

from landmark_jax.runtime import file_io

WORKDIR_LEASE = "trainer.lease"
HEARTBEAT_SECONDS = 30.0
# Four missed heartbeats: a holder that long silent is taken to be gone.
STALE_SECONDS = 120.0
# How often a watched record is read again (at most), in seconds.
WATCH_SECONDS = 1.0


class LeaseHeld(RuntimeError):
    """Another live holder has the lease (the message names it)."""


class LeaseLost(RuntimeError):
    """A holder's lease was taken over (its heartbeat lapsed)."""


def _clock(seconds) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(seconds or 0)))


def _describe(record: dict | None) -> str:
    """Names a record's holder; its times are by the holder's own clock."""
    if not record:
        return "a holder that has not written its record yet"
    return (
        f"host {record.get('host')}, pid {record.get('pid')}, started "
        f"{_clock(record.get('started'))}, last heartbeat {_clock(record.get('heartbeat'))} "
        "by its clock"
    )


class Lease:
    """An exclusive lease on `path` (see the module docstring)."""

    def __init__(
        self,
        path: str,
        *,
        heartbeat_seconds: float = HEARTBEAT_SECONDS,
        stale_seconds: float = STALE_SECONDS,
        settle_seconds: float = 2.0,
    ):
        self.path = path
        self.heartbeat_seconds = heartbeat_seconds
        self.stale_seconds = stale_seconds
        self.settle_seconds = settle_seconds
        self._record = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "token": uuid.uuid4().hex,
            "started": time.time(),
        }
        self._beats = 0  # the record's heartbeat count: readers watch it change
        self._local_file = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lost: str | None = None

    # --- Acquire ---------------------------------------------------------------

    def acquire(self, wait_seconds: float = 0.0) -> Lease:
        """Takes the lease, waiting up to `wait_seconds` for a live holder.

        At once when the lease is free, locally, or held by a process of this
        machine; a record of another machine is first watched (up to
        `stale_seconds`, see the module docstring).

        Raises:
          LeaseHeld: another live holder still has it, named in the message.
        """
        deadline = time.monotonic() + wait_seconds
        while True:
            try:
                if file_io.is_url(self.path) or not self._acquire_local():
                    self._acquire_record()
                return self
            except LeaseHeld:
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.5 if file_io.is_url(self.path) else 0.05)

    def _acquire_local(self) -> bool:
        """flock; False where the filesystem has no locks (some FUSE mounts)."""
        import errno
        import fcntl

        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        f = open(self.path, "a+")  # noqa: SIM115 (held open while the lease is held)
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            text = f.read()
            f.close()
            raise LeaseHeld(f"{self.path}: held by {_describe(_parse(text))}") from None
        except OSError as e:
            f.close()
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                raise
            logging.warning("%s: no file locks here (%s); using a heartbeat lease", self.path, e)
            return False
        f.seek(0)
        f.truncate()
        f.write(json.dumps({**self._record, "heartbeat": time.time()}))
        f.flush()
        self._local_file = f
        return True

    def _read_record(self) -> dict | None:
        try:
            return _parse(file_io.read_text(self.path))
        except FileNotFoundError:
            return None

    def _lapsed(self, record: dict) -> str:
        """Why another holder's `record` may be taken over.

        Returns:
          The reason, for the log.

        Raises:
          LeaseHeld: its holder is alive: a live process of this machine, or
            a record that changed while it was watched.
        """
        if record.get("host") == self._record["host"]:
            # This machine: its process table and its clock are ours.
            if not _pid_alive(record.get("pid")):
                return "its process is gone"
            age = time.time() - float(record.get("heartbeat", 0.0))
            if age > self.stale_seconds:
                return f"no heartbeat for {age:.0f} s"
            raise LeaseHeld(f"{self.path}: held by {_describe(record)}")
        # Another machine: watch the record on our own monotonic clock.
        logging.info(
            "%s: held by %s; watching its record for up to %.0f s to see whether it is alive",
            self.path,
            _describe(record),
            self.stale_seconds,
        )
        start = time.monotonic()
        pause = min(WATCH_SECONDS, self.stale_seconds / 10)
        while (waited := time.monotonic() - start) < self.stale_seconds:
            time.sleep(min(pause, self.stale_seconds - waited))
            now = self._read_record()
            if now is None:
                # Gone twice in a row: released (not a rewrite read mid-way,
                # which filesystems that replace by delete-and-write allow).
                time.sleep(pause)
                now = self._read_record()
                if now is None:
                    return "it was released"
            if now != record:
                raise LeaseHeld(
                    f"{self.path}: held by {_describe(now)} (its record changed while watched)"
                )
        return f"its record did not change in {self.stale_seconds:g} s"

    def _write_record(self) -> None:
        self._beats += 1
        record = {**self._record, "beat": self._beats, "heartbeat": time.time()}
        file_io.write_text(self.path, json.dumps(record))

    def _acquire_record(self) -> None:
        current = self._read_record()
        if current is not None and current.get("token") != self._record["token"]:
            why = self._lapsed(current)
            logging.warning(
                "%s: taking over the lease of %s: %s", self.path, _describe(current), why
            )
        self._write_record()
        # Two takers may both have found it free: the later write wins, and
        # the other sees the winner's token after the settle time.
        time.sleep(self.settle_seconds)
        stored = self._read_record()
        if stored is None or stored.get("token") != self._record["token"]:
            raise LeaseHeld(f"{self.path}: taken at the same time by {_describe(stored)}")
        self._thread = threading.Thread(target=self._renew, name="lease-heartbeat", daemon=True)
        self._thread.start()

    # --- Hold --------------------------------------------------------------------

    def _renew(self) -> None:
        while not self._stop.wait(self.heartbeat_seconds):
            try:
                stored = self._read_record()
                if stored is None or stored.get("token") != self._record["token"]:
                    self._lost = f"{self.path}: the lease was taken by {_describe(stored)}"
                    return
                self._write_record()
            except Exception as e:  # a network blip: the next beat tries again
                logging.warning("%s: heartbeat failed (%s)", self.path, e)

    def verify(self) -> None:
        """Raises LeaseLost if the lease has been taken over (URLs only;
        a local lock cannot be lost while its holder lives)."""
        if self._local_file is not None:
            return
        if self._lost is None:
            stored = self._read_record()
            if stored is None or stored.get("token") != self._record["token"]:
                self._lost = f"{self.path}: the lease was taken by {_describe(stored)}"
        if self._lost:
            raise LeaseLost(self._lost)

    # --- Release -----------------------------------------------------------------

    def release(self) -> None:
        """Gives the lease up (removing a record that is still ours)."""
        if self._local_file is not None:
            import fcntl

            fcntl.flock(self._local_file, fcntl.LOCK_UN)
            self._local_file.close()
            self._local_file = None
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        with contextlib.suppress(Exception):
            stored = self._read_record()
            if stored is not None and stored.get("token") == self._record["token"]:
                file_io.remove(self.path)

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _parse(text: str) -> dict | None:
    try:
        record = json.loads(text)
    except ValueError:  # empty (being written) or damaged: no holder named
        return None
    return record if isinstance(record, dict) else None


def _pid_alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, TypeError, ValueError):
        return True
    return True


@contextlib.contextmanager
def workdir_lease(workdir: str) -> Iterator[Lease | None]:
    """Holds `<workdir>/trainer.lease` for a training run; with several
    processes, process 0 holds it and every process learns the outcome.

    Raises:
      LeaseHeld: another trainer is running on `workdir` (its host and pid
        named), in every process of this run.
    """
    import jax

    lease, refusal = None, None
    if jax.process_index() == 0:
        lease = Lease(file_io.join(workdir, WORKDIR_LEASE))
        try:
            lease.acquire()
        except LeaseHeld as e:
            lease, refusal = None, str(e)
    if jax.process_count() > 1:
        import numpy as np
        from jax.experimental import multihost_utils

        took = multihost_utils.broadcast_one_to_all(np.int32(refusal is None))
        if not took and refusal is None:
            refusal = f"{workdir}: process 0 found another trainer on this workdir (see its log)"
    if refusal is not None:
        raise LeaseHeld(
            f"another trainer is running on this workdir ({refusal}); stop it first. "
            "If it is gone (its machine was lost), its lease lapses once its record in the "
            f"bucket has not changed for {STALE_SECONDS:.0f} s, at once on a local disk"
        )
    try:
        yield lease
    finally:
        if lease is not None:
            lease.release()
