"""Drive a headless Chromium over the DevTools protocol: open a page of the Prefect UI, click, read the
layout, take a screenshot. The UI's resume form is a modal behind a click, which ``--screenshot``
cannot reach."""

from __future__ import annotations

import base64
import contextlib
import itertools
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import httpx
from ports import free_port
from websockets.sync.client import connect


class Chromium:
    def __init__(self, width: int = 1400, height: int = 1000) -> None:
        binary = shutil.which("chromium")
        if binary is None:
            raise FileNotFoundError("chromium is not installed (apt-get install chromium)")
        self.port, self.profile = free_port(), tempfile.mkdtemp(prefix="chromium-")
        self.proc = subprocess.Popen(
            [binary, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
             f"--remote-debugging-port={self.port}", f"--window-size={width},{height}",
             f"--user-data-dir={self.profile}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 60
        while True:
            try:
                pages = httpx.get(f"http://127.0.0.1:{self.port}/json", timeout=2).json()
                page = next(p for p in pages if p["type"] == "page")
                break
            except (httpx.TransportError, StopIteration, ValueError):
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError("chromium did not start") from None
                time.sleep(0.5)
        self.ws = connect(page["webSocketDebuggerUrl"], max_size=None, open_timeout=30)
        self.ids = itertools.count(1)

    def send(self, method: str, **params: object) -> dict:
        n = next(self.ids)
        self.ws.send(json.dumps({"id": n, "method": method, "params": params}))
        while True:
            message = json.loads(self.ws.recv(timeout=120))
            if message.get("id") == n:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message["result"]

    def eval(self, expression: str) -> object:
        result = self.send("Runtime.evaluate", expression=expression, awaitPromise=True, returnByValue=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression[:80]}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def open(self, url: str) -> None:
        self.send("Page.navigate", url=url)

    def wait_for(self, expression: str, timeout: float = 60) -> object:
        deadline = time.monotonic() + timeout
        while not (value := self.eval(expression)):
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {expression}")
            time.sleep(0.5)
        return value

    def screenshot(self, path: Path) -> Path:
        path.write_bytes(base64.b64decode(self.send("Page.captureScreenshot", format="png")["data"]))
        return path

    def close(self) -> None:
        self.ws.close()
        # the whole session: the browser's GPU and renderer processes outlive it otherwise (seen: hours at 80 % CPU)
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            pass
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        shutil.rmtree(self.profile, ignore_errors=True)
