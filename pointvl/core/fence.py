"""Fencing: a build writes into its run folder only while its lock is still its own.

A build that was stopped (SIGSTOP, a frozen VM) for longer than the lock's staleness may find, when
it goes on, that another build took its run folder over. Its heartbeat notices within seconds, but a
write may come first; so every atomic write of :mod:`pointvl.core.io` under a fenced folder first
reads the folder's ``build.lock`` and compares its token with this build's, and raises
:class:`LockLost` (one line) instead of writing when they differ.

The fences of this process travel to the processes it starts (a spawn pool's workers) in the
environment variable ``POINTVL_FENCES``; a folder that holds no fence (a unit test, a stage run by
hand) is written without a check.
"""

from __future__ import annotations

import functools
import json
import os

import fsspec

ENV = "POINTVL_FENCES"
LOCK_NAME = "build.lock"
MAX_LOCK_BYTES = 64 * 1024


class LockLost(RuntimeError):
    """This build's run-folder lock is held by another build now; nothing more is written."""


@functools.lru_cache(maxsize=64)
def _spelled(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    from pointvl.core.io import filesystem  # io checks the fences of its writes

    fs, path = filesystem(url)
    return fs, path.rstrip("/")


def _fences() -> dict[str, str]:
    raw = os.environ.get(ENV)
    if not raw:
        return {}
    try:
        fences = json.loads(raw)
    except ValueError:
        return {}
    return fences if isinstance(fences, dict) else {}


def hold(run_dir: str, token: str) -> None:
    """Fence ``run_dir`` with ``token`` in this process and the processes it starts from now on."""
    os.environ[ENV] = json.dumps({**_fences(), os.fspath(run_dir): token})


def drop(run_dir: str) -> None:
    """Remove the fence of ``run_dir`` (its lock was released)."""
    fences = _fences()
    fences.pop(os.fspath(run_dir), None)
    if fences:
        os.environ[ENV] = json.dumps(fences)
    else:
        os.environ.pop(ENV, None)


def lock_token(fs: fsspec.AbstractFileSystem, lock_path: str) -> str | None:
    """The token of the lock at ``lock_path``; None when there is none or it is unreadable."""
    try:
        with fs.open(lock_path, "rb") as f:
            data = f.read(MAX_LOCK_BYTES + 1)
        record = json.loads(data) if len(data) <= MAX_LOCK_BYTES else None
    except (FileNotFoundError, ValueError, RecursionError):
        return None
    return record.get("token") if isinstance(record, dict) else None


def check(fs: fsspec.AbstractFileSystem, path: str) -> None:
    """Raise :class:`LockLost` when ``path`` (as ``fs`` spells it) lies in a fenced run folder whose lock
    is not this build's any more."""
    for run_dir, token in _fences().items():
        run_fs, root = _spelled(run_dir)
        if type(run_fs) is not type(fs) or not path.startswith(root + "/") or path == f"{root}/{LOCK_NAME}":
            continue
        if lock_token(fs, f"{root}/{LOCK_NAME}") != token:
            raise LockLost(f"{run_dir}: this build's lock was taken by another build while it was stopped; "
                           f"it wrote nothing more (not {path.removeprefix(root + '/')}) and stops here")
