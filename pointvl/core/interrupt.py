"""A build ends in seconds when asked to, and leaves no process behind when killed.

- :func:`on_interrupt`: SIGINT (Ctrl-C) or SIGTERM ends the build at once with one line saying how to
  go on: its children (CPU workers, the embedded Prefect server) are stopped and the process exits
  130/143. Every output is written atomically, so nothing finished is lost and the next run resumes
  (its lock is taken over at once on this host: its pid is gone).
- :func:`start_reaper`: a small watcher process. When the build's process dies without cleaning up
  (SIGKILL, the OOM killer), it stops every process the build had started (workers, the resource
  tracker, the embedded server), which would otherwise run on and hold the run folder's database.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from types import FrameType

import psutil

STOP_WAIT_S = 3.0
"""How long stopped children get to exit on SIGTERM before they are killed."""


def stop_children(wait_s: float = STOP_WAIT_S) -> None:
    """Terminate every descendant of this process, kill those still running after ``wait_s``."""
    _stop(psutil.Process().children(recursive=True), wait_s)


def _stop(processes: list[psutil.Process], wait_s: float) -> None:
    """Terminate ``processes``, then kill those still running after ``wait_s``."""
    for process in processes:
        try:
            process.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(processes, timeout=wait_s)
    for process in alive:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass


def on_interrupt(command: str, how_to_resume: str) -> None:
    """End this process on SIGINT/SIGTERM with one line on stderr (``pointvl COMMAND: interrupted ...``)."""

    def interrupted(signum: int, frame: FrameType | None) -> None:
        logging.disable(logging.CRITICAL)  # other threads' errors about stopped workers are no news
        print(f"pointvl {command}: interrupted ({signal.Signals(signum).name}); finished work is kept: "
              f"{how_to_resume} to go on where it stopped", file=sys.stderr, flush=True)
        os.dup2(os.open(os.devnull, os.O_WRONLY), 2)  # nor is what they print while the children stop
        stop_children()
        os._exit(128 + signum)

    global _handler
    _handler = interrupted
    reassert()


_handler: Callable[[int, FrameType | None], None] | None = None


def reassert() -> None:
    """Install :func:`on_interrupt`'s handler again, if it was installed: Prefect's flow engine puts its own
    SIGTERM handler in place while a flow runs (its crash report then waits on a server the same signal
    stopped). Call it first thing in a flow; a no-op outside the main thread or without the CLI."""
    if _handler is not None and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, _handler)
        signal.signal(signal.SIGTERM, _handler)


def start_reaper() -> subprocess.Popen:
    """Start the watcher that stops this process's descendants once this process is gone; returns once it
    watches. It runs this file as a script in isolated mode: it imports only psutil, so it is up at once."""
    reaper = subprocess.Popen([sys.executable, "-I", os.path.abspath(__file__), str(os.getpid())],
                              stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, start_new_session=True)
    assert reaper.stdout is not None
    reaper.stdout.readline()  # "watching"
    reaper.stdout.close()
    return reaper


def reap(pid: int, interval_s: float = 0.5) -> None:
    """Remember the descendants of ``pid`` while it runs; when it is gone, stop those still running."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C to the group is the build's to handle
    try:
        main = psutil.Process(pid)
    except psutil.NoSuchProcess:
        print("watching", flush=True)
        return
    known: dict[int, float] = {}
    first = True
    while True:
        try:
            if not main.is_running() or main.status() == psutil.STATUS_ZOMBIE:
                break
            for child in main.children(recursive=True):
                if child.pid != os.getpid():
                    known[child.pid] = child.create_time()
        except psutil.NoSuchProcess:
            break
        if first:
            print("watching", flush=True)
            first = False
        time.sleep(interval_s)
    left = []
    for child_pid, created in known.items():
        try:
            child = psutil.Process(child_pid)
            if child.create_time() == created:  # not a later process that reuses the pid
                left.append(child)
        except psutil.NoSuchProcess:
            continue
    _stop(left, STOP_WAIT_S)


if __name__ == "__main__":
    reap(int(sys.argv[1]))
