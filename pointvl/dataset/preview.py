"""Serve a run's ``previews/`` folder over HTTP, so the Prefect UI can show the contact sheets.

Prefect's image artifacts and the review form's description hold URLs that the reviewer's browser
fetches (``data:`` images are stripped by the UI), so a build waiting for review serves its previews
while it waits. Read-only, one folder, stdlib only; bound to loopback unless told otherwise.

```python
with PreviewServer("/data/gr3d/previews", host="127.0.0.1", port=0) as server:
    server.url_for("review-shard-00000.png")   # http://127.0.0.1:<port>/review-shard-00000.png
```

``pointvl preview RUN_DIR`` runs the same server in the foreground. A build suspended for review has
no process while it waits, so it starts the server detached (:func:`serve_detached`): a process of
its own that outlives the build and is stopped when the review is answered (:func:`stop_detached`).
A port in use (another build's server) falls back to a free one.
"""

from __future__ import annotations

import errno
import functools
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType

from pointvl.core import io

logger = logging.getLogger(__name__)


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        logger.debug("preview %s: " + format, self.client_address[0], *args)


class PreviewServer:
    """A background HTTP server for one local folder (``port=0``: any free port).

    Args:
        folder: the folder to serve (a local path; fsspec URLs cannot be served from here).
        host: the address to bind; ``127.0.0.1`` keeps it on this machine.
        port: the port, 0 for any free one (see :attr:`port` after start).
        base_url: the URL browsers use to reach it (default ``http://{host}:{port}``).
        exact: a ``port`` in use is an error (``OSError``) instead of falling back to a free port: for serving
            again at an address that links already name (``pointvl preview RUN``).
    """

    def __init__(self, folder: str, host: str = "127.0.0.1", port: int = 0, base_url: str = "",
                 exact: bool = False) -> None:
        if "://" in folder:
            raise ValueError(f"can only serve a local folder, got {folder}; sync previews/ to a web bucket instead")
        self.folder = Path(folder)
        self.host, self.requested_port, self.base_url = host, port, base_url.rstrip("/")
        self.exact = exact
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("the preview server has not started")
        return self._server.server_address[1]

    @property
    def url(self) -> str:
        return self.base_url or f"http://{self.host}:{self.port}"

    def url_for(self, name: str) -> str:
        return f"{self.url}/{name}"

    def start(self) -> PreviewServer:
        self.folder.mkdir(parents=True, exist_ok=True)
        handler = functools.partial(_QuietHandler, directory=str(self.folder))
        try:
            self._server = ThreadingHTTPServer((self.host, self.requested_port), handler)
        except OSError as err:
            if err.errno != errno.EADDRINUSE or not self.requested_port or self.exact:
                raise
            logger.warning("preview port %d is in use (another build's previews?); serving on a free port",
                           self.requested_port)
            self._server = ThreadingHTTPServer((self.host, 0), handler)
        self._thread = threading.Thread(target=self._server.serve_forever, name="pointvl-preview", daemon=True)
        self._thread.start()
        logger.info("serving %s at %s", self.folder, self.url)
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> PreviewServer:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


def _answers(url: str) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(url + "/", timeout=2):
            return True
    except OSError:
        return False


def detached_url(state_path: str) -> str | None:
    """The URL of the detached server recorded in ``state_path``, if it still answers."""
    try:
        state = json.loads(Path(state_path).read_text())
    except (OSError, ValueError):
        return None
    return state["url"] if _answers(f"http://{state['host']}:{state['port']}") else None


def serve_detached(folder: str, state_path: str, log_path: str, host: str = "127.0.0.1", port: int = 0,
                   base_url: str = "", timeout_s: float = 30.0) -> str:
    """Serve ``folder`` from a process of its own (reused if one already serves it); returns its URL.

    The process writes ``state_path`` (pid, host, port, url) once it listens, and runs until
    :func:`stop_detached`; it does not die with the caller (a suspended build exits while it waits).
    """
    url = detached_url(state_path)
    if url is not None:
        return url
    Path(state_path).unlink(missing_ok=True)
    Path(log_path).parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pointvl.dataset.preview", folder, state_path, host, str(port), base_url],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
    deadline = time.monotonic() + timeout_s
    while (url := detached_url(state_path)) is None:
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the preview server for {folder} did not start; see {log_path}")
        time.sleep(0.2)
    return url


def stop_detached(state_path: str) -> None:
    """Stop the detached server recorded in ``state_path`` (nothing if none runs).

    The record stays, without the pid: the review's artifacts name its address, and ``pointvl preview RUN``
    serves there again so that they show after the review."""
    try:
        state = json.loads(Path(state_path).read_text())
    except (OSError, ValueError):
        return
    if "pid" in state:
        try:
            os.kill(int(state.pop("pid")), signal.SIGTERM)
        except (OSError, ValueError):
            pass
        io.write_json(state_path, state)


def _main(folder: str, state_path: str, host: str, port: str, base_url: str) -> None:
    server = PreviewServer(folder, host, int(port), base_url).start()
    io.write_json(state_path, {"pid": os.getpid(), "host": host, "port": server.port, "url": server.url})
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    _main(*sys.argv[1:6])
