"""Where the CPU stages run: N worker processes on this machine, or an existing Dask cluster.

Both executors take plain module-level functions and picklable arguments (a run folder URL, a
shard of the plan, config dataclasses) and return small results (stats); data moves through the
run folder, never through the executor. Which process runs a unit of work never changes what it
writes: every random choice is seeded from the config and the model id.

- :class:`ProcessPool` (``--workers N``, default: the cores this process may use): N processes
  started once per build with the heavy imports done (Open3D, trimesh, pyarrow), reused for every
  shard. ``spawn``, not ``fork``: the orchestrator's process has threads (Prefect's event loop).
- :class:`DaskCluster` (``--dask-scheduler tcp://HOST:PORT``): a client of a running
  ``distributed`` scheduler; its workers need pointvl installed and the run folder (a shared
  filesystem or an ``s3://`` URL) within reach.
- :class:`InProcess` (``--workers 0``): everything in this process, one unit at a time (debugging;
  ``memory://`` run folders, which exist per process).
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import logging.handlers
import multiprocessing
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

from pointvl.core.errors import InputError

logger = logging.getLogger(__name__)

__all__ = [
    "DaskCluster", "Executor", "InProcess", "ProcessPool", "check_placement", "default_workers", "open_executor",
    "worker_id",
]


def default_workers() -> int:
    """The cores this process may run on (its CPU affinity, which containers and Slurm narrow)."""
    return len(os.sched_getaffinity(0))


def worker_id() -> str:
    """``host:pid`` of the process running this, recorded in stage stats (which machine built what)."""
    return f"{socket.gethostname()}:{os.getpid()}"


class _ToOwnLogger(logging.Handler):
    """Hands a worker's log record to the logger of the same name here (and so to its handlers)."""

    def handle(self, record: logging.LogRecord) -> bool:
        logging.getLogger(record.name).handle(record)
        return True


def _exit_with(parent: int) -> None:
    """End this worker once the build's process ``parent`` is gone (killed: nothing else would end it)."""
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(1)


def _warm(log_queue: Any = None, level: int = logging.INFO) -> None:
    """Import what the CPU stages use once per worker, not once per shard; send its log records to
    ``log_queue`` (the build's process logs them as its own: a dropped model's warning is not lost).
    The worker ends within a second of the build's process (a SIGKILL would leave it running) and leaves
    Ctrl-C to it."""
    threading.Thread(target=_exit_with, args=(os.getppid(),), name="pointvl-parent-watch", daemon=True).start()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the build stops its workers
    if log_queue is not None:
        root = logging.getLogger()
        root.handlers[:] = [logging.handlers.QueueHandler(log_queue)]
        root.setLevel(level)
    import open3d  # noqa: F401
    import pyarrow.parquet  # noqa: F401
    import trimesh  # noqa: F401

    import pointvl.dataset.cpu_stages  # noqa: F401


class Executor:
    """Runs ``fn(*args)`` somewhere; ``as_completed`` yields the futures as they finish."""

    workers: int
    name: str

    def submit(self, fn: Callable[..., Any], *args: Any) -> Any:
        raise NotImplementedError

    def as_completed(self, futures: Iterable[Any]) -> Iterator[Any]:
        return cf.as_completed(list(futures))

    def map(self, fn: Callable[..., Any], items: Iterable[Any], *args: Any) -> Iterator[tuple[int, Any]]:
        """``(i, fn(item_i, *args))`` for every item, in the order they finish."""
        futures = {self.submit(fn, item, *args): i for i, item in enumerate(items)}
        for future in self.as_completed(futures):
            yield futures[future], future.result()

    def close(self) -> None:
        """Release the workers (a Dask cluster itself keeps running)."""

    def __repr__(self) -> str:
        return f"{self.name} ({self.workers} workers)"


class InProcess(Executor):
    workers, name = 1, "in-process"

    def submit(self, fn: Callable[..., Any], *args: Any) -> cf.Future:
        future: cf.Future = cf.Future()
        future.set_result(fn(*args))  # an exception propagates at once, as in a plain loop
        return future


class ProcessPool(Executor):
    name = "process pool"

    def __init__(self, workers: int) -> None:
        self.workers = workers
        context = multiprocessing.get_context("spawn")
        queue = context.Queue()
        self.logs = logging.handlers.QueueListener(queue, _ToOwnLogger())
        self.logs.start()
        level = logging.getLogger("pointvl").getEffectiveLevel()
        self.pool = cf.ProcessPoolExecutor(workers, mp_context=context, initializer=_warm, initargs=(queue, level))
        # a spawn pool starts a process per submission that finds none idle: start all of them now, so that
        # they import Open3D while this process lists the input
        for _ in range(workers):
            self.pool.submit(int)

    def submit(self, fn: Callable[..., Any], *args: Any) -> cf.Future:
        return self.pool.submit(fn, *args)

    def close(self) -> None:
        self.pool.shutdown(cancel_futures=True)
        self.logs.stop()


class DaskCluster(Executor):
    name = "dask"

    def __init__(self, address: str) -> None:
        try:
            from distributed import Client
        except ImportError as err:
            raise ImportError("--dask-scheduler needs distributed: pip install 'pointvl[dask]'") from err
        try:
            self.client = Client(address, set_as_default=False, timeout="30s")
        except OSError as err:  # distributed raises OSError (TimeoutError) for an unreachable scheduler
            raise InputError(f"--dask-scheduler {address}: cannot connect ({err})") from err
        self.workers = max(1, sum(self.client.nthreads().values()))
        self.name = f"dask {address}"

    def submit(self, fn: Callable[..., Any], *args: Any) -> Any:
        return self.client.submit(fn, *args, pure=False)  # pure=False: a re-run is never served from memory

    def as_completed(self, futures: Iterable[Any]) -> Iterator[Any]:
        from distributed import as_completed

        return iter(as_completed(list(futures), loop=self.client.loop))

    def close(self) -> None:
        self.client.close()


def check_placement(workers: int | None, dask_scheduler: str | None, *urls: str) -> None:
    """Raise :class:`InputError` for settings no executor can take (checked before any work)."""
    if dask_scheduler and workers is not None:
        raise InputError("give --workers or --dask-scheduler, not both (the Dask cluster has its own workers)")
    if workers is not None and workers < 0:
        raise InputError(f"--workers must be >= 0 (0: in this process), got {workers}")
    if dask_scheduler and "://" not in dask_scheduler:
        raise InputError(f"--dask-scheduler takes the scheduler's address, tcp://HOST:PORT, got {dask_scheduler!r}")
    if any(u.startswith("memory://") for u in urls) and (dask_scheduler or workers != 0):
        raise InputError("a memory:// folder exists only in this process: build it with --workers 0")


@contextmanager
def open_executor(workers: int | None = None, dask_scheduler: str | None = None, *urls: str) -> Iterator[Executor]:
    """The executor for ``--workers`` / ``--dask-scheduler``, released when the block ends.

    ``urls``: the input and run folder, which every worker must reach (a ``memory://`` filesystem
    exists only in this process, so it needs ``--workers 0``).
    """
    check_placement(workers, dask_scheduler, *urls)
    if dask_scheduler:
        executor: Executor = DaskCluster(dask_scheduler)
    else:
        n = default_workers() if workers is None else workers
        executor = InProcess() if n == 0 else ProcessPool(n)
    logger.info("CPU stages run on: %r", executor)
    try:
        yield executor
    finally:
        executor.close()
