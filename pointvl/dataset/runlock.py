"""One build per run folder: ``RUN/build.lock``, taken by every entry point before any stage runs.

The lock file names its holder (flow run, deployment, host, pid, since) and carries a heartbeat the
holder's process refreshes while it runs. A holder is **alive** when

- its flow run is paused, suspended for review, scheduled or pending (``flow_run_state`` says so:
  a suspended review has no process at all and keeps the folder locked for as long as it waits), or
- its process beats: the heartbeat is younger than ``stale_after_s`` and, on this host, its pid
  exists.

A lock whose holder is not alive is **stale** (a killed or finished build) and is taken over; the
flow run that holds it may re-enter (a suspended build resumed by its reviewer). The lock is
created exclusively on local filesystems (``O_EXCL``); on object stores, which have no exclusive
create, it is written and read back, which serialises builds that start seconds apart.

```python
with RunLock(run_dir, {"flow_run_id": "…", "deployment": "build-benchmark/scheduled"}) as lock:
    ...                      # RunFolderLocked (one line naming the holder) if another build holds it
```
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from types import TracebackType
from typing import Any

from fsspec.implementations.local import LocalFileSystem

from pointvl.core import io
from pointvl.core.errors import InputError
from pointvl.dataset.run_folder import RunFolder

logger = logging.getLogger(__name__)

LIVE_STATES = ("PAUSED", "SCHEDULED", "PENDING", "CANCELLING")
"""Flow-run states in which a build goes on without a process of its own (a suspended review)."""
UNKNOWN = "UNKNOWN"
"""The holder's flow run lives on a Prefect API this process does not talk to: assume it goes on."""
FINAL_STATES = ("COMPLETED", "FAILED", "CANCELLED", "CRASHED")


class RunFolderLocked(InputError):
    """Another build holds the run folder; the message names it."""

    def __init__(self, run_dir: str, holder: dict[str, Any], state: str | None) -> None:
        self.holder = holder
        if state == UNKNOWN:
            what = (f"its flow run lives on the Prefect API at {holder.get('api_url')}: set PREFECT_API_URL to it, "
                    f"or remove {RunFolder.of(run_dir).lock} if that build is gone")
        else:
            what = f"wait for it, or answer its review with `pointvl review {run_dir}`"
        super().__init__(f"{run_dir} is in use by {describe(holder, state)}; this build did not start ({what})")


def describe(holder: dict[str, Any], state: str | None = None) -> str:
    who = f"flow run {holder['flow_run_id']}" if holder.get("flow_run_id") else "a local build"
    where = f" of deployment {holder['deployment']}" if holder.get("deployment") else ""
    status = f", {state.lower()}" if state and state != UNKNOWN else ""
    return f"{who}{where} (pid {holder.get('pid')} on {holder.get('host')}, since {holder.get('since')}{status})"


def read_holder(run_dir: str) -> dict[str, Any] | None:
    """The lock's holder record, or None when the folder is not locked (or the lock is unreadable)."""
    path = RunFolder.of(run_dir).lock
    try:
        return json.loads(io.read_bytes(path))
    except FileNotFoundError:
        return None
    except (ValueError, UnicodeDecodeError):  # a lock cut by a kill mid-write holds nobody
        logger.warning("%s is unreadable; treating the run folder as unlocked", path)
        return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def holder_alive(holder: dict[str, Any], state: str | None, stale_after_s: float) -> bool:
    """Whether ``holder`` still owns its build (``state``: its flow run's state type, None if unknown)."""
    if state in FINAL_STATES:
        return False
    if state in (*LIVE_STATES, UNKNOWN):
        return True
    if holder.get("host") == socket.gethostname() and not _pid_alive(int(holder.get("pid", -1))):
        return False
    return time.time() - float(holder.get("heartbeat", 0)) < stale_after_s


class RunLock:
    """The run folder's build lock.

    Args:
        run_dir: the run folder (path or fsspec URL).
        holder: what to record about this build (``flow_run_id``, ``deployment``, ``api_url``, ...);
            host, pid, since and heartbeat are added.
        flow_run_state: returns a holder's flow-run state type (``"PAUSED"``...) or None when it cannot
            tell (no server, another server); the library never talks to Prefect itself.
        stale_after_s: a running holder whose heartbeat is older than this is taken to be dead.
        heartbeat_s: how often this process refreshes its heartbeat while it holds the lock.
    """

    def __init__(self, run_dir: str, holder: dict[str, Any],
                 flow_run_state: Callable[[dict[str, Any]], str | None] = lambda _: None,
                 stale_after_s: float = 120.0, heartbeat_s: float = 15.0) -> None:
        if heartbeat_s * 2 > stale_after_s:
            raise ValueError("stale_after_s must be at least twice heartbeat_s")
        self.run_dir, self.flow_run_state = run_dir, flow_run_state
        self.stale_after_s, self.heartbeat_s = stale_after_s, heartbeat_s
        self.holder = {**holder, "host": socket.gethostname(), "pid": os.getpid(),
                       "since": datetime.now(UTC).isoformat(timespec="seconds"), "token": uuid.uuid4().hex}
        self.taken_over: dict[str, Any] | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def state_of(self, holder: dict[str, Any]) -> str | None:
        return self.flow_run_state(holder) if holder.get("flow_run_id") else None

    def check(self) -> None:
        """Raise :class:`RunFolderLocked` if a live build other than this flow run holds the folder."""
        current = read_holder(self.run_dir)
        if current is None or self._same_run(current):
            return
        state = self.state_of(current)
        if holder_alive(current, state, self.stale_after_s):
            raise RunFolderLocked(self.run_dir, current, state)

    def _same_run(self, other: dict[str, Any]) -> bool:
        return bool(self.holder.get("flow_run_id")) and other.get("flow_run_id") == self.holder.get("flow_run_id")

    def acquire(self) -> RunLock:
        """Take the lock (a stale one is taken over and kept in :attr:`taken_over`); start the heartbeat."""
        current = read_holder(self.run_dir)
        if current is not None:
            self.check()
            if not self._same_run(current):
                self.taken_over = current
                logger.warning("%s: taking over the lock of %s, which is no longer running", self.run_dir,
                               describe(current, self.state_of(current)))
            self._remove()
        self._create()
        self._thread = threading.Thread(target=self._beat, name="pointvl-lock-heartbeat", daemon=True)
        self._thread.start()
        return self

    def _record(self) -> bytes:
        return (json.dumps({**self.holder, "heartbeat": time.time()}, indent=2, sort_keys=True) + "\n").encode()

    def _create(self) -> None:
        fs, path = io.filesystem(RunFolder.of(self.run_dir).lock)
        fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        if isinstance(fs, LocalFileSystem):
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:  # another build took it between our read and now
                raise RunFolderLocked(self.run_dir, read_holder(self.run_dir) or {}, None) from None
            with os.fdopen(fd, "wb") as f:
                f.write(self._record())
            return
        io.write_bytes(RunFolder.of(self.run_dir).lock, self._record())
        time.sleep(1.0)  # let a concurrent writer land, then see who won
        if (read_holder(self.run_dir) or {}).get("token") != self.holder["token"]:
            raise RunFolderLocked(self.run_dir, read_holder(self.run_dir) or {}, None)

    def _remove(self) -> None:
        fs, path = io.filesystem(RunFolder.of(self.run_dir).lock)
        if fs.exists(path):
            fs.rm(path)

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            current = read_holder(self.run_dir)
            if current is None or current.get("token") != self.holder["token"]:
                logger.error("%s: the build lock was taken by %s", self.run_dir, describe(current or {}))
                return
            io.write_bytes(RunFolder.of(self.run_dir).lock, self._record())

    def keep(self) -> None:
        """Stop the heartbeat but leave the lock in place: the flow run goes on without this process
        (suspended for review); its state keeps the folder locked."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def release(self) -> None:
        """Stop the heartbeat and remove the lock if it is still this build's."""
        self.keep()
        if (read_holder(self.run_dir) or {}).get("token") == self.holder["token"]:
            self._remove()

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()
