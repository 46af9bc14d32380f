"""Serve a run's ``previews/`` folder over HTTP, so the Prefect UI can show the contact sheets.

Prefect's image artifacts and the review form's description hold URLs that the reviewer's browser
fetches (``data:`` images are stripped by the UI), so a build waiting for review serves its previews
while it waits. Read-only, one folder, stdlib only; bound to loopback unless told otherwise.

```python
with PreviewServer("/data/gr3d/previews", host="127.0.0.1", port=0) as server:
    server.url_for("review-shard-00000.png")   # http://127.0.0.1:<port>/review-shard-00000.png
```

``pointvl preview RUN_DIR`` runs the same server in the foreground.
"""

from __future__ import annotations

import functools
import logging
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType

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
    """

    def __init__(self, folder: str, host: str = "127.0.0.1", port: int = 0, base_url: str = "") -> None:
        if "://" in folder:
            raise ValueError(f"can only serve a local folder, got {folder}; sync previews/ to a web bucket instead")
        self.folder = Path(folder)
        self.host, self.requested_port, self.base_url = host, port, base_url.rstrip("/")
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
        self._server = ThreadingHTTPServer((self.host, self.requested_port), handler)
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
