"""One build per run folder: ``RUN/build.lock``, taken by every entry point before any stage runs.

The lock file names its holder (flow run, deployment, host, pid, since) and carries a heartbeat the
holder's process refreshes while it runs. A holder is **alive** when

- its flow run is paused, suspended for review, scheduled or pending (``flow_run_state`` says so:
  a suspended review has no process at all and keeps the folder locked for as long as it waits), or
- its process beats: the heartbeat is younger than ``stale_after_s`` and, on this host, its
  process is the one that took the lock: the pid exists, was started at the recorded time
  (``/proc/PID/stat``, so a reused pid is not taken for the holder) and the host has not rebooted
  since (its boot id).

A lock whose holder is not alive is **stale** (a killed or finished build) and is taken over; the
flow run that holds it may re-enter (a suspended build resumed by its reviewer). A lock file that
is empty, cut or not a lock record holds nobody and is reclaimed with one warning.

On a local filesystem the lock is written whole to a temporary file and hard-linked into place
(exclusive, and complete or absent: a full disk leaves no lock), never rewritten: the heartbeat is
the file's mtime, touched through the holder's own descriptor. Every take-over and release runs
under ``flock`` of ``RUN/build.lock.guard``, so of builds taking over one stale lock at the same
moment exactly one wins. A build stopped long enough to lose its lock (SIGSTOP) writes nothing more
when it goes on: every write under the run folder checks the lock's token (:mod:`pointvl.core.fence`).
On object stores, which have no exclusive create, the lock is written and read back, which
serialises builds that start seconds apart, and the heartbeat rewrites it.

```python
with RunLock(run_dir, {"flow_run_id": "…", "deployment": "build-benchmark/scheduled"}) as lock:
    ...                      # RunFolderLocked (one line naming the holder) if another build holds it
```
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from types import TracebackType
from typing import Any

from fsspec.implementations.local import LocalFileSystem

from pointvl.core import fence, io
from pointvl.core.errors import InputError
from pointvl.dataset.run_folder import RunFolder

logger = logging.getLogger(__name__)

LIVE_STATES = ("PAUSED", "SCHEDULED", "PENDING", "CANCELLING")
"""Flow-run states in which a build goes on without a process of its own (a suspended review)."""
UNKNOWN = "UNKNOWN"
"""The holder's flow run lives on a Prefect API this process does not talk to: assume it goes on."""
FINAL_STATES = ("COMPLETED", "FAILED", "CANCELLED", "CRASHED")


MAX_LOCK_BYTES = fence.MAX_LOCK_BYTES
"""A lock file larger than this is damaged (a holder record is a few hundred bytes)."""
GUARD_WAIT_S = 30.0
"""How long a build waits for another one's take-over or release (milliseconds, unless that one is stopped)."""


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
    if holder.get("damaged"):
        return f"a damaged lock file ({holder['damaged']})"
    who = f"flow run {holder['flow_run_id']}" if holder.get("flow_run_id") else "a local build"
    where = f" of deployment {holder['deployment']}" if holder.get("deployment") else ""
    status = f", {state.lower()}" if state and state != UNKNOWN else ""
    return f"{who}{where} (pid {holder.get('pid')} on {holder.get('host')}, since {holder.get('since')}{status})"


def boot_id() -> str | None:
    """This host's boot id (changes at every boot); None where the kernel does not tell."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return None


def _stat_fields(pid: int) -> list[bytes] | None:
    """``/proc/PID/stat`` from field 3 (the state) on; None where there is no such process or no ``/proc``."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    return stat.rsplit(b")", 1)[-1].split()  # the name (field 2) may hold spaces and brackets


def process_start(pid: int) -> str | None:
    """When process ``pid`` started (clock ticks since boot, ``/proc/PID/stat`` field 22); None where
    there is no such process or no ``/proc``."""
    fields = _stat_fields(pid)
    return fields[19].decode() if fields is not None and len(fields) > 19 else None


def _parse_holder(data: bytes) -> dict[str, Any]:
    """A lock file's holder record, or ``{"damaged": why}``."""
    if not data.strip():
        return {"damaged": "empty"}
    if len(data) > MAX_LOCK_BYTES:
        return {"damaged": f"larger than {MAX_LOCK_BYTES // 1024} KiB"}
    try:
        record = json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError):  # cut by a kill mid-write, or not a lock at all
        return {"damaged": "not JSON"}
    if not isinstance(record, dict) or not isinstance(record.get("token"), str):
        return {"damaged": "not a lock record"}
    return record


def read_holder(run_dir: str) -> dict[str, Any] | None:
    """The lock's holder record, None when the folder is not locked, ``{"damaged": why}`` for a lock file
    that holds nobody. A local lock's ``heartbeat`` is its file's mtime."""
    fs, path = io.filesystem(RunFolder.of(run_dir).lock)
    try:
        if isinstance(fs, LocalFileSystem):
            with open(path, "rb") as f:
                data, mtime = f.read(MAX_LOCK_BYTES + 1), os.fstat(f.fileno()).st_mtime
        else:
            with fs.open(path, "rb") as f:
                data, mtime = f.read(MAX_LOCK_BYTES + 1), None
    except FileNotFoundError:
        return None
    holder = _parse_holder(data)
    if mtime is not None and not holder.get("damaged"):
        holder["heartbeat"] = mtime
    return holder


def pid_alive(pid: int) -> bool:
    """Whether ``pid`` runs. A zombie does not: a killed process stays one until its parent reaps it, which
    for an orphan is the machine's init (seen taking seconds in a VM), yet ``kill(pid, 0)`` succeeds on it."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    fields = _stat_fields(pid)
    return fields is None or fields[:1] != [b"Z"]  # no /proc: kill(pid, 0) is all there is


def _process_gone(holder: dict[str, Any]) -> bool:
    """Whether the process named by a holder on this host is certainly gone (rebooted, exited, pid reused)."""
    if holder.get("boot_id") and boot_id() and holder["boot_id"] != boot_id():
        return True
    pid = holder.get("pid")
    if not isinstance(pid, int) or pid <= 0 or not pid_alive(pid):
        return True
    started = process_start(pid)
    return bool(holder.get("pid_start")) and started is not None and started != holder["pid_start"]


def holder_alive(holder: dict[str, Any], state: str | None, stale_after_s: float) -> bool:
    """Whether ``holder`` still owns its build (``state``: its flow run's state type, None if unknown)."""
    if holder.get("damaged") or state in FINAL_STATES:
        return False
    if state in (*LIVE_STATES, UNKNOWN):
        return True
    if holder.get("host") == socket.gethostname() and _process_gone(holder):
        return False
    heartbeat = holder.get("heartbeat", 0)
    return isinstance(heartbeat, int | float) and time.time() - heartbeat < stale_after_s


class RunLock:
    """The run folder's build lock.

    Args:
        run_dir: the run folder (path or fsspec URL).
        holder: what to record about this build (``flow_run_id``, ``deployment``, ``api_url``, ...);
            host, pid, its start time, boot id, since and token are added.
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
                       "pid_start": process_start(os.getpid()), "boot_id": boot_id(),
                       "since": datetime.now(UTC).isoformat(timespec="seconds"), "token": uuid.uuid4().hex}
        self.taken_over: dict[str, Any] | None = None
        self.lost = threading.Event()
        self._fd: int | None = None  # the local lock file, for the heartbeat's touch
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def state_of(self, holder: dict[str, Any]) -> str | None:
        return self.flow_run_state(holder) if holder.get("flow_run_id") else None

    def check(self) -> None:
        """Raise :class:`RunFolderLocked` if a live build other than this flow run holds the folder."""
        current = read_holder(self.run_dir)
        if current is not None:
            self._refuse_if_alive(current)

    def _refuse_if_alive(self, current: dict[str, Any]) -> None:
        if self._same_run(current):
            return
        state = self.state_of(current)
        if holder_alive(current, state, self.stale_after_s):
            raise RunFolderLocked(self.run_dir, current, state)

    def _same_run(self, other: dict[str, Any]) -> bool:
        return bool(self.holder.get("flow_run_id")) and other.get("flow_run_id") == self.holder.get("flow_run_id")

    @contextlib.contextmanager
    def _guard(self) -> Iterator[None]:
        """Hold ``RUN/build.lock.guard`` (local filesystems): take-overs and releases, one at a time."""
        fs, path = io.filesystem(RunFolder.of(self.run_dir).lock)
        fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        if not isinstance(fs, LocalFileSystem):
            yield
            return
        fd = os.open(f"{path}.guard", os.O_CREAT | os.O_RDWR, 0o644)
        try:
            deadline = time.monotonic() + GUARD_WAIT_S
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise RunFolderLocked(self.run_dir, read_holder(self.run_dir) or {}, None) from None
                    time.sleep(0.01)
            yield
        finally:
            os.close(fd)  # releases the flock

    def acquire(self) -> RunLock:
        """Take the lock (a stale one is taken over and kept in :attr:`taken_over`); start the heartbeat."""
        with self._guard():
            current = read_holder(self.run_dir)
            if current is not None:
                self._refuse_if_alive(current)
                if current.get("damaged"):
                    logger.warning("%s is damaged (%s): reclaiming it", RunFolder.of(self.run_dir).lock,
                                   current["damaged"])
                elif not self._same_run(current):
                    self.taken_over = current
                    logger.warning("%s: taking over the lock of %s, which is no longer running", self.run_dir,
                                   describe(current, self.state_of(current)))
                self._remove()
            self._create()
        fence.hold(self.run_dir, self.holder["token"])
        self._thread = threading.Thread(target=self._beat, name="pointvl-lock-heartbeat", daemon=True)
        self._thread.start()
        return self

    def _record(self) -> bytes:
        return (json.dumps({**self.holder, "heartbeat": time.time()}, indent=2, sort_keys=True) + "\n").encode()

    def _create(self) -> None:
        fs, path = io.filesystem(RunFolder.of(self.run_dir).lock)
        if isinstance(fs, LocalFileSystem):
            tmp = f"{path}.tmp-{self.holder['token']}"
            fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            try:
                os.write(fd, self._record())  # a few hundred bytes: one write
                os.fsync(fd)
                os.link(tmp, path)  # exclusive, and the file is complete before it has the lock's name
            except FileExistsError:  # a build outside the guard (another host) took it between our read and now
                os.close(fd)
                raise RunFolderLocked(self.run_dir, read_holder(self.run_dir) or {}, None) from None
            except BaseException:
                os.close(fd)
                raise
            finally:
                os.unlink(tmp)
            self._fd = fd
            return
        io.write_bytes(RunFolder.of(self.run_dir).lock, self._record())
        time.sleep(1.0)  # let a concurrent writer land, then see who won
        if (read_holder(self.run_dir) or {}).get("token") != self.holder["token"]:
            raise RunFolderLocked(self.run_dir, read_holder(self.run_dir) or {}, None)

    def _remove(self) -> None:
        fs, path = io.filesystem(RunFolder.of(self.run_dir).lock)
        with contextlib.suppress(FileNotFoundError):
            fs.rm(path)

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            current = read_holder(self.run_dir)
            if current is None or current.get("token") != self.holder["token"]:
                self.lost.set()
                logger.error("%s: the build lock was taken by %s; this build writes nothing more", self.run_dir,
                             describe(current or {}))
                return
            if self._fd is not None:
                os.utime(self._fd)  # this build's own file, even if another build's replaced it meanwhile
            else:
                io.write_bytes(RunFolder.of(self.run_dir).lock, self._record())

    def keep(self) -> None:
        """Stop the heartbeat but leave the lock in place: the flow run goes on without this process
        (suspended for review); its state keeps the folder locked."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        fence.drop(self.run_dir)
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def release(self) -> None:
        """Stop the heartbeat and remove the lock if it is still this build's."""
        self.keep()
        with self._guard():
            if (read_holder(self.run_dir) or {}).get("token") == self.holder["token"]:
                self._remove()

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()
