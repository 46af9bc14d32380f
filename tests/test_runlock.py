"""The run-folder lock: one build per folder, live holders named, stale ones taken over."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from pointvl.dataset.run_folder import RunFolder
from pointvl.dataset.runlock import RunFolderLocked, RunLock, read_holder


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
    for heartbeat, alive in ((time.time(), True), (time.time() - 5, False)):
        (tmp_path / "run" / "build.lock").write_text(json.dumps({**record, "heartbeat": heartbeat}))
        other = RunLock(run, {}, stale_after_s=0.6, heartbeat_s=0.1)
        if alive:
            with pytest.raises(RunFolderLocked):
                other.check()
        else:
            other.check()


def test_the_heartbeat_moves_while_held(tmp_path):
    run = str(tmp_path / "run")
    with RunLock(run, {}, stale_after_s=1.0, heartbeat_s=0.2):
        first = read_holder(run)["heartbeat"]
        time.sleep(0.7)
        assert read_holder(run)["heartbeat"] > first


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
