"""The run-folder lock: one build per folder, live holders named, stale ones taken over."""

from __future__ import annotations

import errno
import json
import logging
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from pointvl.core import io
from pointvl.dataset.run_folder import RunFolder
from pointvl.dataset.runlock import RunFolderLocked, RunLock, process_start, read_holder


def test_a_second_build_is_refused_with_one_line_naming_the_holder(tmp_path):
    run = str(tmp_path / "run")
    with RunLock(run, {"flow_run_id": "run-a", "deployment": "build-benchmark/scheduled"}):
        with pytest.raises(RunFolderLocked) as err:
            RunLock(run, {"flow_run_id": "run-b"}).acquire()
        message = str(err.value)
        assert "\n" not in message and "run-a" in message and "build-benchmark/scheduled" in message
    assert read_holder(run) is None  # released


def test_the_same_flow_run_re_enters_its_own_lock(tmp_path):
    run = str(tmp_path / "run")
    first = RunLock(run, {"flow_run_id": "run-a"}).acquire()
    first.keep()  # suspended: no process, lock kept
    again = RunLock(run, {"flow_run_id": "run-a"}).acquire()
    assert again.taken_over is None and read_holder(run)["token"] == again.holder["token"]
    again.release()


def test_a_suspended_holder_stays_alive_without_a_process(tmp_path):
    run = str(tmp_path / "run")
    RunLock(run, {"flow_run_id": "run-a"}).acquire().keep()
    record = json.loads((tmp_path / "run" / "build.lock").read_text())
    record["pid"], record["heartbeat"] = 2**22 + 1, 0.0  # no such process, no heartbeat for ages
    (tmp_path / "run" / "build.lock").write_text(json.dumps(record))
    with pytest.raises(RunFolderLocked, match="paused"):
        RunLock(run, {"flow_run_id": "run-b"}, flow_run_state=lambda _: "PAUSED").acquire()
    taker = RunLock(run, {"flow_run_id": "run-b"}, flow_run_state=lambda _: "FAILED").acquire()
    assert taker.taken_over["flow_run_id"] == "run-a"
    taker.release()


def test_a_killed_holder_is_stale_at_once_on_its_host(tmp_path):
    run = str(tmp_path / "run")
    code = ("import sys, os; from pointvl.dataset.runlock import RunLock; "
            "RunLock(sys.argv[1], {}).acquire(); os._exit(0)")  # exits without releasing, as a SIGKILL would
    subprocess.run([sys.executable, "-c", code, run], check=True, timeout=60)
    assert read_holder(run) is not None
    with RunLock(run, {}) as lock:
        assert lock.taken_over is not None


def test_a_holder_on_another_host_is_alive_while_it_beats(tmp_path):
    run = str(tmp_path / "run")
    lock = RunLock(run, {}, stale_after_s=0.6, heartbeat_s=0.1).acquire()
    record = read_holder(run)
    lock.keep()
    record["host"] = "elsewhere"
    path = tmp_path / "run" / "build.lock"
    for heartbeat, alive in ((time.time(), True), (time.time() - 5, False)):
        path.write_text(json.dumps(record))
        os.utime(path, (heartbeat, heartbeat))  # a local lock's heartbeat is its mtime
        other = RunLock(run, {}, stale_after_s=0.6, heartbeat_s=0.1)
        if alive:
            with pytest.raises(RunFolderLocked):
                other.check()
        else:
            other.check()


def test_the_heartbeat_moves_while_held_and_the_lock_file_is_never_rewritten(tmp_path):
    run = str(tmp_path / "run")
    with RunLock(run, {}, stale_after_s=1.0, heartbeat_s=0.2):
        first, inode = read_holder(run)["heartbeat"], os.stat(tmp_path / "run" / "build.lock").st_ino
        time.sleep(0.7)
        assert read_holder(run)["heartbeat"] > first
        assert os.stat(tmp_path / "run" / "build.lock").st_ino == inode


def test_a_lock_on_an_object_store_serialises_builds():
    run = "memory://locks/run"
    with RunLock(run, {"flow_run_id": "a"}):
        with pytest.raises(RunFolderLocked):
            RunLock(run, {"flow_run_id": "b"}).acquire()
    assert read_holder(run) is None and RunFolder.of(run).lock.endswith("build.lock")


def test_a_holder_on_an_api_this_process_cannot_ask_is_assumed_alive(tmp_path):
    run = str(tmp_path / "run")
    RunLock(run, {"flow_run_id": "run-a", "api_url": "http://elsewhere:4200/api"}).acquire().keep()
    with pytest.raises(RunFolderLocked, match="set PREFECT_API_URL to it, or remove"):
        RunLock(run, {}, flow_run_state=lambda _: "UNKNOWN").check()


def _stale_lock(run, pid=2**22 + 1, **fields):
    """A lock left by a dead build of this host."""
    os.makedirs(run, exist_ok=True)
    record = {"host": socket.gethostname(), "pid": pid, "since": "2026-01-01T00:00:00+00:00",
              "token": "dead" + os.path.basename(run), **fields}
    with open(os.path.join(run, "build.lock"), "w") as f:
        json.dump(record, f)


def _race(runs, barrier, results):
    for run in runs:
        barrier.wait()
        lock = RunLock(run, {})
        try:
            lock.acquire()
        except RunFolderLocked:
            results.put((run, "refused", None))
        except Exception as err:  # noqa: BLE001  (a crash is what the test looks for)
            results.put((run, "crashed", repr(err)))
        else:
            lock.keep()  # leave the lock, so the test sees whose it is
            results.put((run, "won", lock.holder["token"]))
    barrier.wait()  # no racer exits (its lock goes stale) before every racer has raced the last round


def test_racing_take_overs_of_a_stale_lock_have_exactly_one_winner(tmp_path):
    rounds, racers = 300, 3
    runs = [str(tmp_path / f"run-{r:03d}") for r in range(rounds)]
    for run in runs:
        _stale_lock(run)
    context = multiprocessing.get_context("fork")  # the racers need no imports: they start at once
    barrier, results = context.Barrier(racers), context.Queue()
    procs = [context.Process(target=_race, args=(runs, barrier, results)) for _ in range(racers)]
    for p in procs:
        p.start()
    outcomes = [results.get(timeout=120) for _ in range(rounds * racers)]
    for p in procs:
        p.join(timeout=60)
    crashed = [o for o in outcomes if o[1] == "crashed"]
    assert not crashed, crashed[:3]
    for run in runs:
        winners = [o[2] for o in outcomes if o[0] == run and o[1] == "won"]
        assert len(winners) == 1, (run, winners)
        assert read_holder(run)["token"] == winners[0]


def test_an_empty_or_damaged_lock_is_reclaimed_with_one_line(tmp_path, caplog):
    for i, content in enumerate((b"", b"{\"pid\": 12", b"[" * 5000, b"x" * 100_000, b"[1, 2]")):
        run = str(tmp_path / f"run-{i}")
        os.makedirs(run)
        (tmp_path / f"run-{i}" / "build.lock").write_bytes(content)
        RunLock(run, {}).check()  # not refused
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="pointvl.dataset.runlock"), RunLock(run, {}) as lock:
            assert read_holder(run)["token"] == lock.holder["token"]
        lines = [r.getMessage() for r in caplog.records]
        assert len(lines) == 1 and "is damaged" in lines[0] and "reclaiming it" in lines[0], lines


def test_a_full_disk_leaves_no_lock_file(tmp_path, monkeypatch):
    run = tmp_path / "run"
    real_write = os.write

    def full(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", full)
    with pytest.raises(OSError, match="No space left"):
        RunLock(str(run), {}).acquire()
    monkeypatch.setattr(os, "write", real_write)
    assert sorted(p.name for p in run.iterdir()) == ["build.lock.guard"]  # no lock, no temporary file
    with RunLock(str(run), {}):  # space freed: the next build starts
        pass


def test_a_reused_pid_or_a_reboot_does_not_keep_a_dead_holder_alive(tmp_path):
    alive_pid = os.getpid()  # a process that exists, but is not the one that took the lock
    for run, fields in ((str(tmp_path / "reused"), {"pid_start": "1"}),
                        (str(tmp_path / "rebooted"), {"pid_start": process_start(alive_pid), "boot_id": "another"})):
        _stale_lock(run, pid=alive_pid, heartbeat=time.time(), **fields)
        os.utime(os.path.join(run, "build.lock"))  # its heartbeat is fresh
        with RunLock(run, {}) as lock:
            assert lock.taken_over["pid"] == alive_pid
    run = str(tmp_path / "alive")
    _stale_lock(run, pid=alive_pid, pid_start=process_start(alive_pid))
    with pytest.raises(RunFolderLocked):  # the same pid and start time: the holder itself
        RunLock(run, {}).acquire()


STOPPED_BUILD = """
import sys, time
from pointvl.core import io
from pointvl.dataset.runlock import RunLock
run = sys.argv[1]
RunLock(run, {}, stale_after_s=1.0, heartbeat_s=0.2).acquire()
io.write_bytes(run + "/stages/a.txt", b"first")
print("holding", flush=True)
sys.stdin.readline()  # stopped and continued meanwhile
io.write_bytes(run + "/stages/b.txt", b"second")
"""


def test_a_build_that_lost_its_lock_while_stopped_writes_nothing_more(tmp_path):
    run = str(tmp_path / "run")
    build = subprocess.Popen([sys.executable, "-c", STOPPED_BUILD, run], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert build.stdout.readline().strip() == "holding"
        os.kill(build.pid, signal.SIGSTOP)
        time.sleep(1.5)  # its heartbeat goes stale
        with RunLock(run, {}, stale_after_s=1.0, heartbeat_s=0.2) as second:
            assert second.taken_over["pid"] == build.pid
            os.kill(build.pid, signal.SIGCONT)
            _, err = build.communicate("go\n", timeout=60)
            assert build.returncode != 0
            assert "LockLost" in err and "this build's lock was taken by another build" in err
            assert not (tmp_path / "run" / "stages" / "b.txt").exists()
            io.write_bytes(run + "/stages/c.txt", b"the new holder writes")
    finally:
        build.kill()
    assert not [p for p in (tmp_path / "run" / "stages").iterdir() if p.name.startswith(".tmp-")]


def test_a_killed_holder_not_yet_reaped_is_dead():
    """A SIGKILLed build stays a zombie until its parent (for an orphan: init) reaps it; kill(pid, 0) still
    succeeds then, yet the holder is gone and `pointvl resume` must not be refused by it."""
    from pointvl.dataset.runlock import holder_alive, process_start

    child = subprocess.Popen(["sleep", "60"])
    holder = {"host": socket.gethostname(), "pid": child.pid, "pid_start": process_start(child.pid),
              "heartbeat": time.time()}
    assert holder_alive(holder, "RUNNING", stale_after_s=120)
    os.kill(child.pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while open(f"/proc/{child.pid}/stat").read().rsplit(")", 1)[-1].split()[0] != "Z":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    try:
        assert not holder_alive(holder, "RUNNING", stale_after_s=120)  # not reaped: a zombie, still listed
    finally:
        child.wait()
