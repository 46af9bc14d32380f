"""The build's hold on its run folder, as Prefect sees it (:mod:`pointvl.dataset.runlock` is the lock itself).

- :func:`build_lock` makes the lock for the current flow run: the holder record names the flow run,
  its deployment and the API it lives on, and a holder's liveness is asked of that API, so a build
  suspended for review keeps the folder while no process of it runs.
- A holder found dead while the server still calls it RUNNING (its worker was killed) is marked
  CRASHED, as Prefect would have if its process had had the chance.
- Each build records where it ran (``RUN/reports/last_build.json``), so ``pointvl resume RUN_DIR``
  resumes a deployed build on its deployment and a local one locally.
"""

from __future__ import annotations

import logging
import os
import uuid
from typing import Any

from prefect.client.orchestration import get_client
from prefect.context import FlowRunContext
from prefect.exceptions import ObjectNotFound
from prefect.settings import PREFECT_API_URL
from prefect.states import Crashed

from pointvl.core import io
from pointvl.dataset.run_folder import RunFolder
from pointvl.dataset.runlock import UNKNOWN, RunLock, describe, read_holder

logger = logging.getLogger(__name__)

STALE_AFTER_S = float(os.environ.get("POINTVL_LOCK_STALE_S", "120"))
"""A running holder that has not refreshed its heartbeat for this long is dead (set lower in tests)."""
HEARTBEAT_S = min(15.0, STALE_AFTER_S / 4)
"""How often a holder refreshes its heartbeat."""


def api_url() -> str:
    """The Prefect API of this process; empty for the embedded server, which no other process can reach."""
    return PREFECT_API_URL.value() or ""


def holder_state(holder: dict[str, Any]) -> str | None:
    """The state type of the flow run holding a lock; None for a build outside any server (embedded),
    ``UNKNOWN`` for a flow run on another API than this process's."""
    if not holder.get("flow_run_id") or not holder.get("api_url"):
        return None
    if holder["api_url"] != api_url():
        return UNKNOWN
    try:
        with get_client(sync_client=True) as client:
            run = client.read_flow_run(uuid.UUID(holder["flow_run_id"]))
    except (ObjectNotFound, ValueError):
        return "CANCELLED"  # a run the server does not know holds nothing
    return run.state.type.value if run.state else None


def build_lock(run_dir: str) -> RunLock:
    """The lock for the current flow run (or for a process outside any flow run)."""
    context = FlowRunContext.get()
    run = context.flow_run if context else None
    deployment = ""
    if run is not None and run.deployment_id is not None:
        with get_client(sync_client=True) as client:
            d = client.read_deployment(run.deployment_id)
            deployment = f"{context.flow.name}/{d.name}"
    holder = {"flow_run_id": str(run.id) if run else "", "deployment": deployment,
              "deployment_id": str(run.deployment_id or "") if run else "", "api_url": api_url() if run else ""}
    return RunLock(run_dir, holder, flow_run_state=holder_state, stale_after_s=STALE_AFTER_S, heartbeat_s=HEARTBEAT_S)


def check_unlocked(run_dir: str) -> None:
    """Refuse (one line, :class:`~pointvl.dataset.runlock.RunFolderLocked`) if a live build holds ``run_dir``; a dead
    holder the server still shows RUNNING is marked crashed here, which also frees its deployment's
    concurrency slot for the build about to start."""
    lock = RunLock(run_dir, {}, flow_run_state=holder_state, stale_after_s=STALE_AFTER_S, heartbeat_s=HEARTBEAT_S)
    lock.check()
    holder = read_holder(run_dir)
    if holder is not None:
        mark_crashed(holder)


def mark_crashed(holder: dict[str, Any]) -> None:
    """The server still shows a dead holder RUNNING: record that it crashed."""
    if holder_state(holder) != "RUNNING":
        return
    with get_client(sync_client=True) as client:
        client.set_flow_run_state(uuid.UUID(holder["flow_run_id"]), force=True, state=Crashed(
            message=f"the build's process stopped without finishing: {describe(holder)}"))
    logger.warning("marked flow run %s crashed (its process was killed)", holder["flow_run_id"])


def record_build(run_dir: str, lock: RunLock) -> None:
    """Remember where this build runs, for ``pointvl resume RUN_DIR``."""
    keys = ("flow_run_id", "deployment", "deployment_id", "api_url", "since")
    io.write_json(RunFolder.of(run_dir).last_build, {k: lock.holder[k] for k in keys})
