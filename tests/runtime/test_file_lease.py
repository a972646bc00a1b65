"""Leases: one trainer per workdir."""

import contextlib
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time

import pytest
from configs_for_tests import REPO, config_for

from landmark_jax import trainer
from landmark_jax.runtime import file_io, file_lease

# Seconds, not minutes: the record-based lease's timing, shrunk for tests.
FAST = {"heartbeat_seconds": 0.05, "stale_seconds": 0.5, "settle_seconds": 0.01}
HOLD = (
    "import sys, time\n"
    "from landmark_jax.runtime import file_lease\n"
    "lease = file_lease.Lease(sys.argv[1]).acquire()\n"
    "print('held', flush=True)\n"
    "time.sleep(120)\n"
)


def test_a_local_lease_is_exclusive_and_dies_with_its_holder(tmp_path):
    path = str(tmp_path / "trainer.lease")
    first = file_lease.Lease(path).acquire()
    me = rf"held by host {socket.gethostname()}, pid {os.getpid()}, started"
    with pytest.raises(file_lease.LeaseHeld, match=me):
        file_lease.Lease(path).acquire()
    first.release()
    file_lease.Lease(path).acquire().release()

    # A holder killed with SIGKILL leaves its file, but not its lock.
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, path], cwd=REPO, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(file_lease.LeaseHeld, match=f"pid {holder.pid},"):
            file_lease.Lease(path).acquire()
    finally:
        holder.kill()
        holder.wait()
    assert os.path.exists(path)
    file_lease.Lease(path).acquire().release()


def _write_record(path, **fields):
    record = {"host": "elsewhere", "pid": 1, "token": "theirs", "started": time.time()}
    file_io.write_text(path, json.dumps({**record, "heartbeat": time.time(), **fields}))


@contextlib.contextmanager
def _beating(path, clock_offset=0.0, **fields):
    """A live holder on another machine whose clock is `clock_offset` s off
    ours: it rewrites its record with the next count every 0.05 s."""
    stop = threading.Event()

    def beat():
        count = 0
        while not stop.is_set():
            count += 1
            _write_record(path, beat=count, heartbeat=time.time() + clock_offset, **fields)
            stop.wait(0.05)

    thread = threading.Thread(target=beat, daemon=True)
    thread.start()
    while not file_io.exists(path):  # its first record is written
        time.sleep(0.01)
    try:
        yield
    finally:
        stop.set()
        thread.join()


def test_a_lease_in_a_bucket_renews_lapses_and_knows_when_it_is_lost():
    path = "ram://lease-test/run/trainer.lease"
    first = file_lease.Lease(path, **FAST).acquire()
    with pytest.raises(file_lease.LeaseHeld, match=f"pid {os.getpid()},"):
        file_lease.Lease(path, **FAST).acquire()
    beat = json.loads(file_io.read_text(path))["beat"]
    time.sleep(0.3)
    assert json.loads(file_io.read_text(path))["beat"] > beat  # the heartbeat renews it
    first.verify()
    first.release()
    assert not file_io.exists(path)  # a released lease leaves nothing

    # A holder on another machine: held while it beats, free once it stops.
    with _beating(path), pytest.raises(file_lease.LeaseHeld, match="held by host elsewhere,"):
        file_lease.Lease(path, **FAST).acquire()
    # (No heartbeat during the test: it would race the takeover below.)
    second = file_lease.Lease(path, **{**FAST, "heartbeat_seconds": 60}).acquire()
    # Taken over while it ran (as if its heartbeats had stopped): it must stop.
    _write_record(path, host="other", pid=7)
    with pytest.raises(file_lease.LeaseLost, match="the lease was taken by host other, pid 7"):
        second.verify()
    second.release()
    assert file_io.exists(path)  # not ours any more: left alone

    # A holder on this machine whose process is gone: no need to wait.
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], **_text())
    _write_record(path, host=socket.gethostname(), pid=int(gone.stdout))
    started = time.monotonic()
    file_lease.Lease(path, **{**FAST, "stale_seconds": 60}).acquire().release()
    assert time.monotonic() - started < 5


@pytest.mark.parametrize("offset", [-180.0, 3600.0, -3600.0])
def test_a_bucket_lease_judges_its_holder_on_the_readers_clock_alone(offset, caplog):
    """The holder's clock is `offset` s off the reader's (the review's S8):
    a live holder keeps its lease and a dead one lapses after stale_seconds
    of the reader's own time, whatever the holder's clock says (was: a live
    holder 3 min slow taken over at once; a dead one 1 h fast held for 1 h)."""
    path = f"ram://lease-skew/{offset:+.0f}/trainer.lease"
    live = pytest.raises(file_lease.LeaseHeld, match="record changed while watched")
    with _beating(path, clock_offset=offset), live:
        file_lease.Lease(path, **FAST).acquire()
    # It stops beating (killed): taken over once its record has not changed
    # for stale_seconds (0.5 s) as the reader measures.
    started = time.monotonic()
    with caplog.at_level(logging.WARNING):
        taker = file_lease.Lease(path, **FAST).acquire()
    assert 0.5 <= time.monotonic() - started < 5
    assert "taking over the lease of host elsewhere" in caplog.text
    assert "its record did not change in 0.5 s" in caplog.text
    assert json.loads(file_io.read_text(path))["token"] != "theirs"
    taker.release()


def _text():
    return {"capture_output": True, "text": True, "check": True}


@pytest.mark.e2e
def test_a_second_trainer_on_a_workdir_fails_at_once(demo, tmp_path):
    workdir = str(tmp_path / "run")
    # What a trainer at work holds (a second process would see the same lock).
    running = file_lease.Lease(os.path.join(workdir, file_lease.WORKDIR_LEASE)).acquire()
    try:
        with pytest.raises(
            file_lease.LeaseHeld,
            match=rf"another trainer is running on this workdir \(.*pid {os.getpid()},",
        ):
            trainer.train_and_evaluate(config_for(demo["full"], total_steps=2), workdir)
        assert os.listdir(workdir) == [file_lease.WORKDIR_LEASE]  # nothing written
    finally:
        running.release()
