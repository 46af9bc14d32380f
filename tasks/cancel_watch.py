"""Ending the runs of a work pool that stay *Cancelling* on this host (``pointvl cancel-watch --pool POOL``).

Why. Prefect 3.8.8's process worker watches each flow run it starts for cancellation with an observer of
its own (a websocket, then polling when that fails). A server outage longer than ~30 s kills that observer
for good: its polling is a ``critical_service_loop`` that stops after 3 failures in a row
(prefect/_internal/observers.py:271-290, prefect/utilities/services.py:25-26) and nothing restarts it
("Cancellation observer failed. Flow run cancellation disabled."). A run that was in flight across the
outage then stays *Cancelling* when cancelled, its process running on; the worker's own observer only
cancels runs that have not started (prefect/workers/base.py:1893). Runs started after the outage are fine.

What. ``make worker-cpu`` / ``make worker-gpu`` start this watch beside the worker. Every
``interval_s`` it asks the server for the pool's runs that have been *Cancelling* for more than
``grace_s`` (Prefect's observer, when alive, acts within a second), and for each whose process runs on
this host (the pid the run names, with that run's id in its environment) it does what the worker would
have done: SIGTERM to the run's process group (a flow process leads its own session), SIGKILL after
``kill_after_s``, then the state *Cancelled*. A failed request (server down) is tried again at the next
interval, forever. The watch exits within a second of the worker (its parent) exiting.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
import uuid
from datetime import UTC, datetime

import httpx
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    FlowRunFilter,
    FlowRunFilterState,
    FlowRunFilterStateType,
    WorkPoolFilter,
    WorkPoolFilterName,
)
from prefect.client.schemas.objects import StateType
from prefect.states import Cancelled

from pointvl.dataset.runlock import pid_alive

logger = logging.getLogger(__name__)


def _runs_process(pid: int, run_id: uuid.UUID) -> bool:
    """Whether ``pid`` is alive here and is the flow process of ``run_id`` (a pid of another host or a reused
    one has no such environment)."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            environ = f.read().split(b"\0")
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return False
    return pid_alive(pid) and f"PREFECT__FLOW_RUN_ID={run_id}".encode() in environ


def _stop(pid: int, run_id: uuid.UUID, kill_after_s: float) -> None:
    for sig, wait_s in ((signal.SIGTERM, kill_after_s), (signal.SIGKILL, 10.0)):
        try:
            if os.getpgid(pid) == pid:  # the flow process leads its own group: its children go with it
                os.killpg(pid, sig)
            else:
                os.kill(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait_s
        while _runs_process(pid, run_id) and time.monotonic() < deadline:
            time.sleep(0.2)
        if not _runs_process(pid, run_id):
            return


def cancel_stuck_runs(pool: str, grace_s: float, kill_after_s: float) -> list[uuid.UUID]:
    """One pass: stop and mark *Cancelled* the runs of ``pool`` stuck *Cancelling* on this host; their ids."""
    stopped = []
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(
                any_=[StateType.CANCELLING]))),
            work_pool_filter=WorkPoolFilter(name=WorkPoolFilterName(any_=[pool])))
        now = datetime.now(UTC)
        for run in runs:
            if run.state is None or (now - run.state.timestamp).total_seconds() < grace_s:
                continue
            pid = (run.infrastructure_pid or "").rpartition(":")[2]
            if not pid.isdigit() or not _runs_process(int(pid), run.id):
                continue  # not a process of this host: the watch of its worker's host handles it
            logger.warning("flow run %s has been Cancelling for %.0f s and its process %s runs on: stopping it",
                           run.id, (now - run.state.timestamp).total_seconds(), pid)
            _stop(int(pid), run.id, kill_after_s)
            client.set_flow_run_state(run.id, force=True, state=Cancelled(
                message="cancelled by pointvl cancel-watch (the worker had lost its cancellation observer)"))
            stopped.append(run.id)
    return stopped


def watch(pool: str, interval_s: float = 10, grace_s: float = 30, kill_after_s: float = 30) -> None:
    """Run :func:`cancel_stuck_runs` every ``interval_s`` until this process's parent (the worker) exits."""
    parent = os.getppid()
    busy = threading.Lock()

    def one_pass() -> None:
        with busy:
            try:
                cancel_stuck_runs(pool, grace_s, kill_after_s)
            except (httpx.HTTPError, OSError) as err:  # the server is down or restarting: the next pass tries again
                logger.debug("cancel-watch pass failed: %s", err)

    next_pass = time.monotonic() + interval_s
    while os.getppid() == parent:
        if time.monotonic() >= next_pass and not busy.locked():
            # a thread, so a request hanging on a stalled server never keeps the watch past its worker
            threading.Thread(target=one_pass, daemon=True).start()
            next_pass = time.monotonic() + interval_s
        time.sleep(1)
