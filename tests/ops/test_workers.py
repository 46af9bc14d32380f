"""Workers as an operator runs them: ``make worker-cpu`` on a real server, stopped with SIGTERM, and a server
restart under a running flow run.

- ``make worker-cpu`` stops on SIGTERM within 10 s, the flow process it started included (the recipe
  ``exec``\\ s the worker, so make's SIGTERM reaches it, and resets SIGINT to its default: Prefect's worker turns
  SIGTERM into SIGINT, which a worker started in the background would otherwise ignore);
- after a server outage a run that was in flight across it is still cancelled: Prefect 3.8.8's worker loses
  that run's cancellation observer, and ``pointvl cancel-watch`` (started beside the worker by the make
  target) stops the run's process and marks it Cancelled; runs started after the restart cancel as usual.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from prefect_api import API

ROOT = Path(__file__).parents[2]
VENV = Path(sys.executable).parents[1]

SLEEPER = """
import sys, time
from prefect import flow

@flow(name="sleeper")
def sleeper(seconds: float = 600) -> None:
    time.sleep(seconds)

if __name__ == "__main__":
    sleeper.from_source(source=sys.argv[1], entrypoint="sleeper.py:sleeper").deploy("sleep", work_pool_name="cpu")
"""


class Worker:
    """``make worker-cpu`` (the exact target an operator runs) against the test's server."""

    def __init__(self, server: dict, tmp: Path) -> None:
        self.api, self.tmp = server["api"], tmp
        self.env = {**server["env"], "PREFECT_WORKER_QUERY_SECONDS": "2"}
        result = subprocess.run([server["prefect"], "work-pool", "create", "cpu", "--type", "process", "--overwrite"],
                                env=self.env, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        (tmp / "sleeper.py").write_text(SLEEPER)
        result = subprocess.run([sys.executable, str(tmp / "sleeper.py"), str(tmp)], env=self.env, cwd=tmp,
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
        self.deployment = API.get(f"{self.api}/deployments/name/sleeper/sleep").json()["id"]
        self.log = tmp / "worker.log"
        # -o: the setup stamp is not remade (the test runs in this venv, set up already)
        self.make = subprocess.Popen(["make", "-s", "-o", f"{VENV}/.installed", f"VENV={VENV}", "worker-cpu"],
                                     env=self.env, cwd=ROOT, stdout=self.log.open("wb"), stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def start_run(self) -> str:
        run = API.post(f"{self.api}/deployments/{self.deployment}/create_flow_run", json={}).json()
        self.wait(run["id"], ("RUNNING",), 120)
        return run["id"]

    def state(self, run_id: str) -> str:
        return API.get(f"{self.api}/flow_runs/{run_id}").json()["state_type"]

    def wait(self, run_id: str, types: tuple[str, ...], timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while (state := self.state(run_id)) not in types:
            assert time.monotonic() < deadline, f"run {run_id} is {state}\n{self.log.read_text()[-3000:]}"
            time.sleep(0.5)
        return state

    def flow_pid(self, run_id: str) -> int:
        return int(API.get(f"{self.api}/flow_runs/{run_id}").json()["infrastructure_pid"].rpartition(":")[2])

    def stop(self) -> None:
        if self.make.poll() is None:
            os.killpg(self.make.pid, signal.SIGKILL)
            self.make.wait()


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] == "Z"  # a zombie has exited
    except FileNotFoundError:
        return True


def _group_gone(pgid: int) -> bool:
    return all(_gone(int(p)) for p in os.listdir("/proc") if p.isdigit() and _pgid(int(p)) == pgid)


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None


def test_make_worker_stops_on_sigterm_within_10_s_with_its_flow_run(prefect_server, tmp_path):
    worker = Worker(prefect_server, tmp_path)
    try:
        run = worker.start_run()
        flow_pid = worker.flow_pid(run)
        assert not _gone(flow_pid) and _pgid(flow_pid) != worker.make.pid  # the flow process has its own session
        os.kill(worker.make.pid, signal.SIGTERM)  # what a supervisor (systemd, docker stop, kill PID) sends
        sent = time.monotonic()
        while not (worker.make.poll() is not None and _group_gone(worker.make.pid) and _gone(flow_pid)):
            assert time.monotonic() - sent < 10, f"still running 10 s after SIGTERM\n{worker.log.read_text()[-3000:]}"
            time.sleep(0.1)
        print(f"\nmake worker-cpu and its flow process gone {time.monotonic() - sent:.1f} s after SIGTERM; "
              f"the run is {worker.state(run)} on the server")
    finally:
        worker.stop()


@pytest.mark.slow  # ~2 min (the server stays down 60 s); make test: the PostgreSQL server in test_deployed.py
def test_cancellation_after_a_server_restart(prefect_server_postgres, restart_server, tmp_path):
    server = prefect_server_postgres
    worker = Worker(server, tmp_path)
    try:
        across = worker.start_run()
        # Down long enough for the run's cancellation observer to give up: its websocket reconnects ~10 times,
        # then it polls every 10 s and stops after 3 failures (prefect/_internal/observers.py:271-290,
        # prefect/utilities/services.py:25-26 at 3.8.8).
        restart_server(server, down_s=60)
        after = worker.start_run()
        for run in (across, after):
            assert API.post(f"{server['api']}/flow_runs/{run}/set_state", json={
                "state": {"type": "CANCELLING", "name": "Cancelling"}, "force": True}).status_code < 300
        assert worker.wait(after, ("CANCELLED",), 60) == "CANCELLED"  # a run started after the restart: Prefect
        stuck_pid = worker.flow_pid(across)
        waited = time.monotonic()
        # the run in flight across the outage: Prefect's observer for it is gone; the watch acts once the run has
        # been Cancelling for 30 s
        assert worker.wait(across, ("CANCELLED",), 120) == "CANCELLED"
        run = API.get(f"{server['api']}/flow_runs/{across}").json()
        assert "pointvl cancel-watch" in run["state"]["message"] and _gone(stuck_pid)
        print(f"\nthe run in flight across a 60 s outage ended Cancelled {time.monotonic() - waited:.0f} s after "
              f"the other one (grace 30 s, passes every 10 s)")
    finally:
        worker.stop()


def test_the_watch_takes_a_pid_for_a_run_only_when_its_environment_names_that_run():
    """A pid of another host, or a reused one, is never stopped (the server's infrastructure_pid is a bare pid)."""
    import uuid

    from pointvl.tasks.cancel_watch import _runs_process

    run, other = uuid.uuid4(), uuid.uuid4()
    proc = subprocess.Popen(["sleep", "60"], env={**os.environ, "PREFECT__FLOW_RUN_ID": str(run)})
    try:
        while Path(f"/proc/{proc.pid}/cmdline").read_bytes() != b"sleep\x0060\x00":  # until the child has exec'd
            time.sleep(0.01)
        assert _runs_process(proc.pid, run) and not _runs_process(proc.pid, other)
        assert not _runs_process(os.getpid(), run)
    finally:
        proc.kill()
        proc.wait()
    assert not _runs_process(proc.pid, run)
