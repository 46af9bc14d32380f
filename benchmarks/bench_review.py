"""`make bench-review`: is a review of the paper's 12,347 items feasible in pages? Measured on a deployed build.

Starts its own ``prefect server start`` (SQLite, a temporary home, a free loopback port), deploys
``build-benchmark/on-demand`` from ``prefect.yaml`` onto a process worker of pool ``cpu``, builds the
fixture (``pointvl fixture``: 36 valid models) with ``--views`` views each at 64² (~1,000 items, the
offline backends), and when the build suspends for review answers **every page through the API**
(``POST /flow_runs/<id>/resume``, what the UI's Submit sends; the first page rejects one item). Per page:
the form's schema and description sizes, the sheet's bytes and the seconds from the answer to the next
page (the last: to Completed). Then the extrapolation to 12,347 items at the same page size. JSON lines,
then a summary.

    python -m benchmarks.bench_review [--views 28] [--page-size 24] [--query-seconds 5] [--out DIR]

Seconds depend on the machine's load (the worker's poll interval ``--query-seconds`` is the floor of each).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).parents[1]
PREFECT = str(Path(sys.executable).parent / "prefect")
PAPER_ITEMS = 12_347


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(args: list[str], env: dict, timeout: float = 300) -> str:
    result = subprocess.run(args, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(args[:4])} failed: {result.stdout[-2000:]}{result.stderr[-2000:]}")
    return result.stdout


def _start(args: list[str], env: dict, log: Path) -> subprocess.Popen:
    return subprocess.Popen(args, env=env, cwd=ROOT, stdout=log.open("wb"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


class Review:
    """The suspended build's pages, read and answered through the server's API."""

    def __init__(self, api: str, run_id: str, out: Path) -> None:
        self.api, self.run_id, self.out = api, run_id, out
        self.http = httpx.Client(timeout=60)

    def state(self) -> str:
        return self.http.get(f"{self.api}/flow_runs/{self.run_id}").json()["state_type"]

    def page(self) -> dict | None:
        path = self.out / "reports" / "review_pending.json"
        try:
            return json.loads(path.read_text()).get("page")
        except (OSError, ValueError):
            return None

    def wait_page(self, after: str | None, timeout: float = 1800) -> dict | None:
        """The next page once its form is saved (``None`` when the run completed)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = self.state()
            if state == "COMPLETED":
                return None
            if state in ("FAILED", "CRASHED", "CANCELLED"):
                raise RuntimeError(f"the build ended {state}")
            page = self.page() if state == "PAUSED" else None
            if page and page.get("key") != after and self.form(page["key"]):
                return page
            time.sleep(0.2)
        raise TimeoutError("no next page")

    def form(self, key: str) -> dict[str, str]:
        inputs = self.http.post(f"{self.api}/flow_runs/{self.run_id}/input/filter",
                                json={"prefix": f"suspended-{key}-", "limit": 10}).json()
        found = {i["key"].rsplit("-", 1)[-1]: i["value"] for i in inputs}
        return found if {"schema", "description"} <= set(found) else {}

    def answer(self, run_input: dict) -> None:
        for attempt in range(5):  # SQLite answers 503 when a write meets another: send again, as Prefect does
            response = self.http.post(f"{self.api}/flow_runs/{self.run_id}/resume", json={"run_input": run_input})
            if response.status_code != 503:
                break
            time.sleep(0.5 * 2**attempt)
        if response.status_code >= 300 or response.json()["status"] != "ACCEPT":
            raise RuntimeError(f"answer refused: {response.text}")


def run(views: int, page_size: int, query_seconds: int, work: Path) -> dict:
    from pointvl.fixture import write_fixture

    shapenet, out, home = work / "shapenet", work / "run", work / "prefect"
    write_fixture(str(shapenet), seed=0)
    port = _free_port()
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_WORKER_QUERY_SECONDS": str(query_seconds),
           "POINTVL_ROOT": str(ROOT), "POINTVL_SHAPENET": str(shapenet), "POINTVL_OUT": str(out),
           "POINTVL_BUILD_CRON": "0 3 * * *", "POINTVL_TRAIN_PRESET": "tiny",
           "PREFECT_LOGGING_EXTRA_LOGGERS": "pointvl"}
    home.mkdir(parents=True)
    server = _start([PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)], env, work / "server.log")
    worker = None
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/api/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline or server.poll() is not None:
                raise RuntimeError(f"prefect server did not start; see {work / 'server.log'}")
            time.sleep(0.5)
        for pool in ("cpu", "gpu"):
            _run([PREFECT, "work-pool", "create", pool, "--type", "process", "--overwrite"], env)
        _run([PREFECT, "--no-prompt", "deploy", "--name", "on-demand"], env)
        worker = _start([PREFECT, "worker", "start", "--pool", "cpu"], env, work / "worker.log")
        overrides = {"shard_size": 64, "clean.test_size": 0.25, "clean.train_size": None,
                     "sample_points.num_points": 512, "render.width": 64, "render.height": 64,
                     "render.views_per_model": views, "gpu_deployments": {}, "handoff.train": False,
                     "review.timeout_s": 86400, "review.page_size": page_size}
        started = time.monotonic()
        stdout = _run([PREFECT, "deployment", "run", "build-benchmark/on-demand", "--param",
                       f"overrides={json.dumps(overrides)}"], env)
        run_id = re.search(r"UUID: ([0-9a-f-]{36})", stdout).group(1)
        review = Review(env["PREFECT_API_URL"], run_id, out)
        page = review.wait_page(None)
        build_s = time.monotonic() - started
        pending = json.loads((out / "reports" / "review_pending.json").read_text())
        items = sum(pending["counts"].values())
        pages = []
        while page is not None:
            form = review.form(page["key"])
            sheet = out / "previews" / page["sheet"].rsplit("/", 1)[-1]
            answer = {"reviewer": "bench"}
            if not pages:
                answer.update(reject=[page["ids"][0]], reject_reason="bench: one rejection")
            t0 = time.monotonic()
            review.answer(answer)
            page_after = review.wait_page(page["key"])
            row = {"page": len(pages) + 1, "shard": page["shard"], "items": len(page["ids"]),
                   "schema_bytes": len(form["schema"]), "description_bytes": len(form["description"]),
                   "sheet_bytes": sheet.stat().st_size, "answer_to_next_s": round(time.monotonic() - t0, 2),
                   "to": "next page" if page_after is not None else "Completed"}
            print(json.dumps(row), flush=True)
            pages.append(row)
            page = page_after
    finally:
        if worker is not None:
            _stop(worker)
        _stop(server)
        from pointvl.dataset.preview import stop_detached

        stop_detached(str(out / "reports" / "preview_server.json"))
    return _summary(items, len(pending["shards"]), page_size, build_s, pages)


def _summary(items: int, shards: int, page_size: int, build_s: float, pages: list[dict]) -> dict:
    seconds = [p["answer_to_next_s"] for p in pages]
    per_page = items / len(pages)
    paper_pages = math.ceil(PAPER_ITEMS / per_page)
    sheet = statistics.mean(p["sheet_bytes"] for p in pages)
    return {
        "items": items, "shards": shards, "page_size": page_size, "pages": len(pages),
        "build_to_first_page_s": round(build_s, 1),
        "schema_bytes_per_page": max(p["schema_bytes"] for p in pages),
        "description_bytes_per_page": max(p["description_bytes"] for p in pages),
        "sheet_bytes_per_page_mean": round(sheet), "sheet_bytes_per_page_max": max(p["sheet_bytes"] for p in pages),
        "answer_to_next_page_s_median": statistics.median(seconds[:-1] or seconds),
        "answer_to_next_page_s_max": max(seconds[:-1] or seconds),
        "last_answer_to_completed_s": seconds[-1],
        "paper_items": PAPER_ITEMS, "paper_pages": paper_pages,
        "paper_sheet_mb_total": round(paper_pages * sheet / 1e6, 1),
        "paper_waiting_on_the_machine_h": round(paper_pages * statistics.median(seconds) / 3600, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--views", type=int, default=28, help="views per model (36 models: 28 -> ~1,000 items)")
    parser.add_argument("--page-size", type=int, default=24)
    parser.add_argument("--query-seconds", type=int, default=5, help="the worker's poll interval")
    parser.add_argument("--out", default="", help="work folder (default: a temporary one)")
    args = parser.parse_args()
    work = Path(args.out or tempfile.mkdtemp(prefix="bench-review-"))
    summary = run(args.views, args.page_size, args.query_seconds, work)
    print(json.dumps(summary))
    print(f"\n{summary['items']} items in {summary['pages']} pages of <= {summary['page_size']}: form schema "
          f"{summary['schema_bytes_per_page']:,} B/page, sheet {summary['sheet_bytes_per_page_mean']:,} B/page "
          f"(max {summary['sheet_bytes_per_page_max']:,}); answer -> next page median "
          f"{summary['answer_to_next_page_s_median']} s (max {summary['answer_to_next_page_s_max']} s), last answer "
          f"-> Completed {summary['last_answer_to_completed_s']} s.\n{PAPER_ITEMS:,} items: ~{summary['paper_pages']} "
          f"pages, ~{summary['paper_sheet_mb_total']} MB of sheets, ~{summary['paper_waiting_on_the_machine_h']} h "
          "spent waiting for the next page (plus the reviewer's own time per page).")


if __name__ == "__main__":
    main()
