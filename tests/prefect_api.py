"""An HTTP client for a test's Prefect server that retries a 503, as Prefect's own clients do.

A SQLite-backed server answers 503 when a write finds the database locked (two processes writing at
once, e.g. a worker's events and the test's request); its transaction was rolled back, so sending the
request again is safe. The UI's user would click again; Prefect's clients retry up to 5 times.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from collections.abc import Callable

import httpx


class _RetryUnavailable(httpx.HTTPTransport):
    def handle_request(self, request: httpx.Request) -> httpx.Response:
        for attempt in range(5):
            response = super().handle_request(request)
            if response.status_code != 503:
                return response
            response.close()
            time.sleep(0.5 * 2**attempt)
        return super().handle_request(request)


API = httpx.Client(transport=_RetryUnavailable(), timeout=60)  # Prefect's client's default timeout


def run_deployment(cli: Callable[..., subprocess.CompletedProcess], prefect: str, name: str, **params: object) -> str:
    """`prefect deployment run NAME --param k=<json>` through the test's ``cli`` (its env and cwd); the run's id."""
    args = [prefect, "deployment", "run", name]
    for key, value in params.items():
        args += ["--param", f"{key}={json.dumps(value)}"]
    result = cli(*args)
    assert result.returncode == 0, result.stdout + result.stderr
    return re.search(r"UUID: ([0-9a-f-]{36})", result.stdout).group(1)
