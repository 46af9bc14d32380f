"""What an operator sees of deployed runs in the Prefect UI, tried on a real `prefect server start` with real
process workers on pools cpu and gpu:

- pointvl's INFO lines (build stages, training ``i/n loss``) are in the runs' logs, the training run has a
  ``train-progress`` artifact, and every artifact key names its run folder and ends in the build id;
- a build whose training hand-off cannot start fails with one line, once, and no traceback;
- ``make deploy`` refuses, in one line, a deployment whose hand-off could not start here, and creates none.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from prefect_api import API, run_deployment

from pointvl.dataset.handoff import build_id
from pointvl.tasks.artifacts import artifact_key

ROOT = Path(__file__).parents[2]
SMALL = {"shard_size": 16, "clean.test_size": 0.25, "clean.train_size": None, "sample_points.num_points": 512,
         "render.width": 64, "render.height": 64, "gpu_deployments": {}, "review.gate": "off"}
# The tiny preset's SFT only, 2 steps, short answers: the hand-off's training run ends in seconds.
TINY_SFT = {"handoff.preset": "tiny", "handoff.variant": "sft",
            "handoff.overrides": {"sft": {"max_steps": 2, "batch_size": 1, "per_device_batch_size": 1},
                                  "eval_max_new_tokens": 8}}


class Ops:
    """The deployments of prefect.yaml on the test's server, workers started as `make worker-*` does."""

    def __init__(self, server: dict, shapenet: str, tmp: Path) -> None:
        self.api, self.prefect, self.tmp = server["api"], server["prefect"], tmp
        self.env = {**server["env"], "POINTVL_ROOT": str(ROOT), "POINTVL_SHAPENET": shapenet,
                    "POINTVL_OUT": str(tmp / "run"), "POINTVL_BUILD_CRON": "0 3 * * *",
                    "POINTVL_TRAIN_PRESET": "tiny", "PREFECT_WORKER_QUERY_SECONDS": "5",
                    "PREFECT_LOGGING_LEVEL": "INFO"}  # Prefect's default (the server fixture quiets it)
        # the workers run without PREFECT_LOGGING_EXTRA_LOGGERS: the flows themselves route pointvl's logs
        self.env.pop("PREFECT_LOGGING_EXTRA_LOGGERS", None)
        self.workers: list[subprocess.Popen] = []

    def cli(self, *args: str, timeout: float = 180, **env: str) -> subprocess.CompletedProcess:
        return subprocess.run(list(args), env={**self.env, **env}, cwd=ROOT, capture_output=True, text=True,
                              timeout=timeout)

    def start_worker(self, *args: str) -> None:
        log = (self.tmp / "worker.log").open("ab")
        self.workers.append(subprocess.Popen([self.prefect, "worker", "start", *args], env=self.env, cwd=ROOT,
                                             stdout=log, stderr=subprocess.STDOUT, start_new_session=True))

    def make_deploy(self, **env: str) -> subprocess.CompletedProcess:
        """`make deploy` with this interpreter's venv, taken as set up (-o: no pip install from a test)."""
        venv = sys.prefix
        return self.cli("make", "-s", "-o", f"{venv}/.installed", "deploy", f"VENV={venv}",
                        f"PREFECT_API_URL={self.api}", timeout=300, **env)

    def run(self, run_id: str) -> dict:
        return API.get(f"{self.api}/flow_runs/{run_id}").json()

    def wait_final(self, run_id: str, timeout: float = 400) -> dict:
        deadline = time.monotonic() + timeout
        while (run := self.run(run_id))["state_type"] not in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
            assert time.monotonic() < deadline, f"run {run_id} is still {run['state_type']}\n{self.worker_log()}"
            time.sleep(1)
        return run

    def logs(self, run_id: str, last: str = "Finished in state", timeout: float = 60) -> list[dict]:
        """The run's logs once the flow process has sent its last line (``last``; they arrive in batches)."""
        deadline = time.monotonic() + timeout
        while True:
            logs = API.post(f"{self.api}/logs/filter", json={"logs": {"flow_run_id": {"any_": [run_id]}},
                                                            "sort": "TIMESTAMP_ASC"}).json()
            if any(last in e["message"] for e in logs):
                return logs
            assert time.monotonic() < deadline, [e["message"][:200] for e in logs]
            time.sleep(1)

    def artifact_keys(self, run_id: str) -> set[str]:
        found = API.post(f"{self.api}/artifacts/filter", json={"artifacts": {"flow_run_id": {"any_": [run_id]}}})
        return {a["key"] for a in found.json() if a["key"]}

    def worker_log(self) -> str:
        path = self.tmp / "worker.log"
        return path.read_text()[-3000:] if path.exists() else ""

    def run_on_demand(self, **params: object) -> str:
        return run_deployment(self.cli, self.prefect, "build-benchmark/on-demand", **params)


@pytest.fixture
def ops(prefect_server, shapenet, tmp_path):
    o = Ops(prefect_server, shapenet.root, tmp_path)
    made = o.make_deploy()
    assert made.returncode == 0, made.stdout[-3000:] + made.stderr[-3000:]
    try:
        yield o
    finally:
        for worker in o.workers:
            if worker.poll() is None:
                os.killpg(worker.pid, signal.SIGKILL)
                worker.wait()
        scheduled = API.get(f"{o.api}/deployments/name/build-benchmark/scheduled").json()
        if "id" in scheduled:  # nothing of this test may fire later in the session
            API.delete(f"{o.api}/deployments/{scheduled['id']}")


def _info_lines(logs: list[dict], logger: str) -> list[str]:
    return [e["message"] for e in logs if e["name"].startswith(logger) and e["level"] == 20]


def test_deployed_runs_show_pointvl_logs_progress_and_artifacts_keyed_by_run_folder_and_build(ops, tmp_path):
    ops.start_worker("--pool", "cpu")
    ops.start_worker("--pool", "gpu", "--work-queue", "gpu", "--limit", "1")
    out = tmp_path / "run"
    build = ops.run_on_demand(out=str(out), overrides={**SMALL, **TINY_SFT})
    done = ops.wait_final(build)
    assert done["state_type"] == "COMPLETED", done["state"]["message"] + ops.worker_log()
    bid = build_id(str(out))

    # 1. The build's library lines (clean's i/n progress, the stages) at INFO, in the run's logs.
    build_logs = ops.logs(build)
    assert any(re.search(r"\d+/\d+ models", m) for m in _info_lines(build_logs, "pointvl.")), (
        [(e["name"], e["message"][:80]) for e in build_logs])

    # 2. The training run its hand-off started, on the gpu pool: SFT's i/n loss lines and a progress artifact.
    train_run = re.search(r"training run ([0-9a-f-]{36})", done["state"]["message"]).group(1)
    trained = ops.wait_final(train_run)
    assert trained["state_type"] == "COMPLETED", trained["state"]["message"] + ops.worker_log()
    train_logs = ops.logs(train_run)
    assert [m.split(" loss")[0] for m in _info_lines(train_logs, "pointvl.train.sft")] == ["sft 1/2", "sft 2/2"]
    train_dir = trained["parameters"]["run_dir"]
    progress = API.post(f"{ops.api}/artifacts/filter", json={"artifacts": {
        "key": {"any_": [artifact_key("train-progress", train_dir, bid)]}}}).json()
    assert progress and progress[0]["type"] == "progress" and progress[0]["data"] == 100.0
    assert progress[0]["description"].startswith("sft 2/2: loss ")

    # 3. Every key of both runs names its run folder and ends in the build id (a second folder built with the
    # same config gets the same build id and other keys).
    keys = ops.artifact_keys(build) | ops.artifact_keys(train_run)
    expected = {artifact_key(kind, str(out), bid) for kind in (
        "progress-clean", "cleaning-report", "progress-cpu-stages", "progress-annotate", "stats-annotate",
        "build-counts", "build-summary", "training-handoff")} | {artifact_key(kind, train_dir, bid) for kind in (
            "train-progress", "train-metrics", "training-curves", "eval-report")}
    assert expected <= keys, expected - keys
    assert all(k.endswith(f"-{bid}") for k in keys), keys
    assert artifact_key("build-summary", str(tmp_path / "other"), bid) != artifact_key("build-summary", str(out), bid)


def test_a_hand_off_that_cannot_start_fails_the_run_with_one_line_once(ops, tmp_path):
    ops.start_worker("--pool", "cpu")
    # the deployed default (POINTVL_TRAIN_PRESET=paper), which has no weights here
    refused = ops.run_on_demand(out=str(tmp_path / "refused"), overrides={**SMALL, "handoff.preset": "paper"})
    run = ops.wait_final(refused, timeout=240)
    assert run["state_type"] == "FAILED" and "\n" not in run["state"]["message"]
    assert run["state"]["message"].startswith("handoff (preset 'paper'): model.checkpoint 'Qwen/Qwen2.5-VL-3B")
    messages = [e["message"] for e in ops.logs(refused)]
    assert sum("is neither a local folder nor" in m for m in messages) == 1, "\n".join(messages)
    assert not [m for m in messages if "Traceback" in m], messages
    assert not (tmp_path / "refused" / "plan.json").exists()


def test_make_deploy_refuses_a_hand_off_that_could_not_start_here_and_creates_nothing(prefect_server, shapenet,
                                                                                     tmp_path):
    o = Ops(prefect_server, shapenet.root, tmp_path)
    before = API.post(f"{o.api}/deployments/filter", json={}).json()
    made = o.make_deploy(POINTVL_TRAIN_PRESET="paper")
    assert made.returncode != 0
    refusal = [line for line in made.stderr.splitlines() if line.startswith("pointvl preflight: error:")]
    assert len(refusal) == 1 and "POINTVL_TRAIN_PRESET=tiny" in refusal[0] and "Qwen/Qwen2.5-VL-3B" in refusal[0]
    assert "Traceback" not in made.stderr
    assert API.post(f"{o.api}/deployments/filter", json={}).json() == before


def _preview(run_dir: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "pointvl.cli", "preview", str(run_dir), *args], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def test_pointvl_preview_serves_the_sheets_again_at_the_address_the_review_artifacts_name(tmp_path, free_port):
    """The review gate's detached preview server (what its image artifacts link to) stops when the review is
    answered; ``pointvl preview RUN`` then serves the same URLs, and says so in one line when it cannot."""
    import httpx

    from pointvl.dataset.preview import serve_detached, stop_detached
    from pointvl.dataset.run_folder import RunFolder

    run = tmp_path / "run"
    folder = RunFolder.of(str(run))
    sheet = b"\x89PNG contact sheet"
    (run / "previews").mkdir(parents=True)
    (run / "reports").mkdir()
    (run / "previews" / "review-shard-00000.png").write_bytes(sheet)
    # the run's config asks for another port: the address actually served (and linked) is what counts
    (run / "config.json").write_text(json.dumps({"review": {"preview_host": "127.0.0.1", "preview_port": 1}}))
    base = serve_detached(folder.previews, folder.preview_server, folder.log("preview.log"), port=free_port())
    url = f"{base}/review-shard-00000.png"  # the artifact's image_url
    assert httpx.get(url, timeout=10).content == sheet
    stop_detached(folder.preview_server)  # the review was answered
    deadline = time.monotonic() + 10
    while True:  # the server process exits on SIGTERM
        try:
            httpx.get(url, timeout=2)
        except httpx.TransportError:
            break
        assert time.monotonic() < deadline, "the preview server did not stop"
        time.sleep(0.2)

    server = _preview(run)
    try:
        assert server.stdout.readline().strip() == f"serving {folder.previews} at {base} (Ctrl-C stops)"
        assert httpx.get(url, timeout=10).content == sheet
        again = subprocess.run([sys.executable, "-m", "pointvl.cli", "preview", str(run)], cwd=ROOT,
                               capture_output=True, text=True, timeout=60)
        assert again.returncode == 0 and again.stdout.strip().endswith(f"already served at {base} (the review's "
                                                                       "preview server)"), again.stdout
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)

    # Another program holds the port: serving elsewhere would break the links, so it refuses in one line.
    import socket

    with socket.socket() as holder:
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        holder.bind(("127.0.0.1", int(base.rsplit(":", 1)[1])))
        holder.listen()
        refused = subprocess.run([sys.executable, "-m", "pointvl.cli", "preview", str(run)], cwd=ROOT,
                                 capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and len(refused.stderr.strip().splitlines()) == 1, refused.stderr
    assert refused.stderr.startswith(f"pointvl preview: error: cannot serve on 127.0.0.1:{base.rsplit(':', 1)[1]}, "
                                     "the address the review's artifacts name")
