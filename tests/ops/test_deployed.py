"""The deployed build as a user runs it: `make deploy` (prefect.yaml) on a real `prefect server start`, a
real process worker on pool cpu, time passing.

- the cron fires by itself and the run goes to the review gate, where it **suspends**: the worker's
  process exits, the run waits past the deployment lease's window (the server's
  ``PREFECT_SERVER_CONCURRENCY_INITIAL_DEPLOYMENT_LEASE_DURATION`` is 30 s here) and the contact sheets
  stay served; a second build of the same folder is refused without running a stage; the form's
  choices reject an item; the run re-enters and completes; the hand-off starts training once, and a
  resume that builds nothing new does not start it again;
- SIGKILL of the worker mid-stage, then ``pointvl resume RUN`` via the deployment: finished shards are
  skipped and the killed run is marked crashed;
- a hand-off whose training could not start refuses the build in seconds.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from io import BytesIO
from pathlib import Path

import httpx
import pyarrow.parquet as pq
import pytest
from PIL import Image
from prefect_api import API, run_deployment

from pointvl.dataset.handoff import build_id
from pointvl.dataset.plan import load_plan
from pointvl.dataset.preview import stop_detached
from pointvl.dataset.run_folder import RunFolder
from pointvl.dataset.stages.review import items, read_log
from pointvl.dataset.tables import read_stats
from pointvl.tasks.artifacts import artifact_key

ROOT = Path(__file__).parents[2]
SMALL = {"shard_size": 16, "clean.test_size": 0.25, "clean.train_size": None, "sample_points.num_points": 512,
         "render.width": 64, "render.height": 64, "gpu_deployments": {}, "review.poll_s": 1}
TINY_HANDOFF = {"handoff.preset": "tiny", "handoff.overrides": {"sft": {"max_steps": 1}}}


class Deployed:
    def __init__(self, server: dict, out: Path, shapenet: str, tmp: Path) -> None:
        self.api, self.prefect, self.out, self.tmp = server["api"], server["prefect"], out, tmp
        self.server_log: Path = server["log"]
        self.env = {**server["env"], "POINTVL_ROOT": str(ROOT), "POINTVL_SHAPENET": shapenet,
                    "POINTVL_OUT": str(out), "POINTVL_BUILD_CRON": "* * * * *", "POINTVL_TRAIN_PRESET": "paper",
                    "PREFECT_LOGGING_EXTRA_LOGGERS": "pointvl", "PREFECT_WORKER_QUERY_SECONDS": "5"}
        self.worker: subprocess.Popen | None = None

    def cli(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run(list(args), env=self.env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)

    def start_worker(self) -> None:
        log = (self.tmp / "worker.log").open("ab")
        self.worker = subprocess.Popen([self.prefect, "worker", "start", "--pool", "cpu"], env=self.env, cwd=ROOT,
                                       stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def kill_worker(self) -> None:
        if self.worker is not None and self.worker.poll() is None:
            os.killpg(self.worker.pid, signal.SIGKILL)
            self.worker.wait()

    def deploy(self, *names: str) -> None:
        """`prefect deploy` of these deployments of prefect.yaml, as `make deploy` does."""
        result = self.cli(self.prefect, "--no-prompt", "deploy", *(a for n in names for a in ("--name", n)),
                          timeout=180)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    def deployment(self, name: str) -> dict:
        return API.get(f"{self.api}/deployments/name/build-benchmark/{name}").json()

    def runs(self, deployment: str | None = None, flow: str = "build-benchmark") -> list[dict]:
        body: dict = {"flows": {"name": {"any_": [flow]}}, "sort": "EXPECTED_START_TIME_ASC"}
        if deployment:
            body["deployments"] = {"id": {"any_": [self.deployment(deployment)["id"]]}}
        return API.post(f"{self.api}/flow_runs/filter", json=body).json()

    def run(self, run_id: str) -> dict:
        return API.get(f"{self.api}/flow_runs/{run_id}").json()

    def wait_state(self, run_id: str, types: tuple[str, ...], timeout: float = 300) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            run = self.run(run_id)
            if run["state_type"] in types:
                return run
            assert run["state_type"] not in ("FAILED", "CRASHED", "CANCELLED") or run["state_type"] in types, (
                f"run {run_id} ended {run['state_type']}: {run['state']['message']}\n{self.logs(run_id)}")
            assert time.monotonic() < deadline, f"run {run_id} is still {run['state_type']}\n{self.logs(run_id)}"
            time.sleep(1)

    def logs(self, run_id: str) -> str:
        logs = API.post(f"{self.api}/logs/filter", json={"logs": {"flow_run_id": {"any_": [run_id]}}}).json()
        worker = (self.tmp / "worker.log").read_text()[-3000:] if (self.tmp / "worker.log").exists() else ""
        return "\n".join(entry["message"][:500] for entry in logs[-30:]) + "\n--- worker:\n" + worker

    def run_on_demand(self, **params: object) -> str:
        return run_deployment(self.cli, self.prefect, "build-benchmark/on-demand", **params)


@pytest.fixture
def deployed(prefect_server_postgres, shapenet, tmp_path):
    """The deployments on a PostgreSQL-backed server, as in production (README "Production database")."""
    server = prefect_server_postgres
    out = tmp_path / "run"
    d = Deployed(server, out, shapenet.root, tmp_path)
    for pool in ("cpu", "gpu"):
        result = d.cli(server["prefect"], "work-pool", "create", pool, "--type", "process", "--overwrite")
        assert result.returncode == 0, result.stderr
    d.deploy("on-demand", "train")
    try:
        yield d
    finally:
        d.kill_worker()
        for name in ("scheduled", "on-demand"):  # nothing of this test may fire later in the session
            deployment = d.deployment(name)
            if "id" in deployment:
                API.delete(f"{d.api}/deployments/{deployment['id']}")
        for run_dir in (p for p in tmp_path.iterdir() if p.is_dir()):  # a preview server left by a failed test
            stop_detached(str(run_dir / "reports" / "preview_server.json"))


def _log_entries(log: str) -> list[str]:
    """A Prefect log split into entries (a line ``HH:MM:SS.mmm | LEVEL | ...`` and what follows it)."""
    return [e for e in re.split(r"\n(?=\d\d:\d\d:\d\d\.\d+ \| )", log) if e.strip() and "|" in e]


def _epoch(iso: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


def _stage_files(out: Path) -> dict[Path, int]:
    return {p: p.stat().st_mtime_ns for p in (out / "stages").rglob("shard-*.parquet") if p.is_file()}


def test_the_cron_fires_the_review_waits_suspended_and_one_build_holds_the_folder(deployed, shapenet):
    d, out = deployed, deployed.out
    d.deploy("scheduled")  # its cron fires every minute from now on
    scheduled = d.deployment("scheduled")
    # The user narrows the deployed config per key (no whole-config restatement), as in the README.
    params = {**scheduled["parameters"], "overrides": {**SMALL, **TINY_HANDOFF, "review.timeout_s": 3600}}
    assert API.patch(f"{d.api}/deployments/{scheduled['id']}", json={"parameters": params}).status_code == 204
    for r in d.runs("scheduled"):  # runs scheduled before the change carry the old parameters
        API.delete(f"{d.api}/flow_runs/{r['id']}")
    d.start_worker()

    # 1. The cron creates a run by itself (no one calls run_deployment) and it starts at its tick.
    deadline = time.monotonic() + 150
    while not (started := [r for r in d.runs("scheduled") if r["state_type"] not in ("SCHEDULED", "PENDING")]):
        assert time.monotonic() < deadline, f"the cron created no running flow run: {d.runs('scheduled')}"
        time.sleep(1)
    first = started[0]
    tick_to_start = (time.time() - _epoch(first["expected_start_time"]))
    for schedule in scheduled["schedules"]:  # stop further ticks: the rest of the test is about this run
        API.patch(f"{d.api}/deployments/{scheduled['id']}/schedules/{schedule['id']}", json={"active": False})
    for r in d.runs("scheduled"):
        if r["state_type"] == "SCHEDULED":
            API.delete(f"{d.api}/flow_runs/{r['id']}")
    assert first["auto_scheduled"] and first["parameters"]["overrides"]["shard_size"] == 16

    # 2. ... and runs to the review gate, where it suspends: its process exits, the lock stays.
    run = d.wait_state(first["id"], ("PAUSED",), timeout=400)
    assert run["state_name"] == "Suspended"
    suspended_at = time.monotonic()
    deadline = time.monotonic() + 60
    while subprocess.run(["pgrep", "-P", str(d.worker.pid)], capture_output=True).returncode == 0:
        assert time.monotonic() < deadline, "the suspended build's process did not exit"
        time.sleep(1)
    lock = json.loads((out / "build.lock").read_text())
    assert lock["flow_run_id"] == first["id"] and lock["deployment"] == "build-benchmark/scheduled"
    pending = json.loads((out / "reports" / "review_pending.json").read_text())

    # 3. The page's sheet stays served with no build process alive, one column wide (legible in the form).
    page = pending["page"]
    sheet = httpx.get(page["sheet"], timeout=10)
    assert sheet.status_code == 200
    assert sheet.content == (out / "previews" / "review-shard-00000-page-000.png").read_bytes()
    assert Image.open(BytesIO(sheet.content)).size[0] <= 600

    # 4. A second build of the same folder (on-demand shares POINTVL_OUT) is refused, naming the holder.
    before = _stage_files(out)
    review_log = out / "reports" / "review_log.jsonl"
    log_before = review_log.read_text() if review_log.exists() else ""
    second = d.run_on_demand(overrides={**SMALL, **TINY_HANDOFF})
    refused = d.wait_state(second, ("CANCELLED",), timeout=180)
    assert first["id"] in refused["state"]["message"] and "\n" not in refused["state"]["message"]
    assert _stage_files(out) == before
    assert (review_log.read_text() if review_log.exists() else "") == log_before

    # 5. The review outlives the lease window (no process, no lease to lose) and stays answerable.
    time.sleep(max(0.0, 35 - (time.monotonic() - suspended_at)))
    assert d.run(first["id"])["state_type"] == "PAUSED"
    inputs = API.post(f"{d.api}/flow_runs/{first['id']}/input/filter",
                      json={"prefix": f"suspended-{page['key']}-schema"}).json()
    schema = json.loads(inputs[0]["value"])
    all_ids = [it.instance_id for i in pending["shards"] for it in items(str(out), i)]
    assert schema["properties"]["reject"]["items"]["enum"] == page["ids"]  # the page's ids as choices, no copying

    # 6. The reviewer picks an item of the page in the form (what the UI sends) and approves the rest of the
    # build in the same answer; the run re-enters and completes.
    rejected = page["ids"][1]
    answered_at = time.monotonic()
    resume = API.post(f"{d.api}/flow_runs/{first['id']}/resume", json={"run_input": {
        "reject": [rejected], "reject_reason": "wrong pose", "reviewer": "ana", "approve_rest": True}})
    assert resume.status_code < 300 and resume.json()["status"] == "ACCEPT", resume.text
    done = d.wait_state(first["id"], ("COMPLETED",), timeout=300)
    resume_s = time.monotonic() - answered_at
    records = [r for f in sorted((out / "shards").glob("*.parquet"))
               for r in pq.read_table(f, columns=["instance_id"]).to_pylist()]
    assert rejected not in {r["instance_id"] for r in records} and len(records) == len(all_ids) - 1
    log = read_log(str(out))
    assert len(log) == len(all_ids)  # one decision per item: nothing decided twice
    assert [(e["decision"], e["source"]) for e in log if e["instance_id"] == rejected] == [("rejected", "prefect form")]
    assert not (out / "build.lock").exists() and not (out / "reports" / "review_pending.json").exists()
    assert API.get(f"{d.api}/flow_runs/{pending['timeout_run_id']}").status_code == 404  # follow-up dropped
    with pytest.raises(httpx.TransportError):
        httpx.get(page["sheet"], timeout=3)  # the preview server went with the review
    assert "review:rejected" in (out / "shards" / "README.md").read_text()
    assert "training run" in done["state"]["message"]
    # the annotate stage's stats are one table artifact of the run, a row per shard as in the run folder
    tables = API.post(f"{d.api}/artifacts/filter", json={"artifacts": {
        "key": {"any_": [artifact_key("stats-annotate", str(out), build_id(str(out)))]},
        "flow_run_id": {"any_": [first["id"]]}}}).json()
    assert tables and all(
        [(r["shard"], r["instances"], r["ok"]) for r in json.loads(t["data"])]
        == [(i, read_stats(str(out), "annotate", i)["instances"], read_stats(str(out), "annotate", i)["ok"])
            for i in pending["shards"]] for t in tables)
    print(f"\ncron tick to run start {tick_to_start:.1f} s; suspended review held "
          f"{answered_at - suspended_at:.0f} s; answer to completed {resume_s:.1f} s")

    # 7. The hand-off started training once; a resume that builds nothing new does not start it again.
    trains = d.runs(flow="train-pointvl")
    assert len(trains) == 1 and trains[0]["parameters"]["preset"] == "tiny"
    again = d.cli(sys.executable, "-m", "pointvl.cli", "resume", str(out))
    assert again.returncode == 0 and "on its workers" in again.stdout, again.stdout + again.stderr
    new_id = re.search(r"flow run ([0-9a-f-]{36})", again.stdout).group(1)
    assert d.wait_state(new_id, ("COMPLETED",), timeout=300)["deployment_id"] == scheduled["id"]
    assert len(d.runs(flow="train-pointvl")) == 1

    # 8. Nothing went wrong on the server meanwhile (scheduler, concurrency, events, database): on PostgreSQL
    # not even the write contention SQLite logs under load ("database is locked").
    errors = [e for e in _log_entries(d.server_log.read_text()) if e.split("|")[1].strip() in ("ERROR", "CRITICAL")]
    assert not errors, "\n\n".join(errors)[-4000:]


def test_a_killed_worker_is_resumed_on_the_deployment_without_redoing_finished_shards(deployed, tmp_path):
    d, out = deployed, tmp_path / "killed"
    from pointvl.dataset.build_config import BuildConfig
    from pointvl.dataset.runner import plan_run

    config = BuildConfig.from_parameters(d.deployment("on-demand")["parameters"]["config"], SMALL)
    plan_run(d.env["POINTVL_SHAPENET"], str(out), config)  # fix the plan to know shard 1's ids
    ids = load_plan(str(out)).shards[1].instance_ids()
    folder = Path(RunFolder.of(str(out)).stage_items("synthesize", 1))
    folder.mkdir(parents=True)
    blocker = folder / f"{ids[-1]}.parquet"
    os.mkfifo(blocker)  # the stage blocks reading this item back: the worker is killed there
    d.start_worker()
    # not incremental: an incremental run would move the unkeyed items folder aside as outdated
    killed = d.run_on_demand(out=str(out), incremental=False,
                             overrides={**SMALL, "review.gate": "off", "handoff.train": False})
    deadline = time.monotonic() + 300
    while len(list(folder.glob("*.parquet"))) < len(ids):
        assert time.monotonic() < deadline and d.run(killed)["state_type"] in ("SCHEDULED", "PENDING", "RUNNING"), (
            d.logs(killed))
        time.sleep(0.5)
    time.sleep(1.0)
    d.kill_worker()  # the worker and, as on a lost machine, the flow process it started (its own session)
    os.kill(json.loads((out / "build.lock").read_text())["pid"], signal.SIGKILL)
    finished = _stage_files(out)
    blocker.unlink()
    assert d.run(killed)["state_type"] == "RUNNING"  # what the server believes of a killed run

    d.start_worker()
    resume = d.cli(sys.executable, "-m", "pointvl.cli", "resume", str(out))
    assert resume.returncode == 0 and "on its workers" in resume.stdout, resume.stdout + resume.stderr
    assert ", Crashed)" in resume.stdout, resume.stdout  # the state resume set, not the stale "Running"
    new_id = re.search(r"flow run ([0-9a-f-]{36})", resume.stdout).group(1)
    d.wait_state(new_id, ("COMPLETED",), timeout=300)
    assert {p: m for p, m in _stage_files(out).items() if p in finished} == finished  # nothing finished redone
    stats = read_stats(str(out), "synthesize", 1)
    assert (stats["generated"], stats["resumed"]) == (1, len(ids) - 1)  # only the unfinished item made again
    assert d.run(killed)["state_type"] == "CRASHED"
    assert len(list((out / "shards").glob("*.parquet"))) == len(load_plan(str(out)).shards)


def test_a_hand_off_that_cannot_start_refuses_the_build_in_seconds(deployed, tmp_path):
    d, out = deployed, tmp_path / "refused"
    d.start_worker()
    refused = d.run_on_demand(out=str(out), overrides=SMALL)  # the deployed hand-off: paper preset, no weights
    run = d.wait_state(refused, ("FAILED",), timeout=180)
    assert "'Qwen/Qwen2.5-VL-3B-Instruct' is neither a local folder nor" in run["state"]["message"]
    assert not (out / "plan.json").exists()  # no stage ran


HOOK = """
import sys
from prefect import flow
from prefect.runtime import flow_run
from pointvl.flows.train import train

@flow(name="build-benchmark")
def build() -> str:  # stands for the build whose hand-off started the training run
    return flow_run.id

build_run = build()
try:
    train(shards=sys.argv[1], run_dir=sys.argv[2], preset="tiny", build_id="abc123abc123",
          build_flow_run_id=build_run)
except Exception:
    pass
print(build_run)
"""


def test_a_failed_training_run_is_reported_on_the_build_that_started_it(prefect_server, tmp_path):
    api = prefect_server["api"]
    result = subprocess.run([sys.executable, "-c", HOOK, str(tmp_path / "no-shards"), str(tmp_path / "train")],
                            env=prefect_server["env"], cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    build_run = result.stdout.split()[-1]
    run = API.get(f"{api}/flow_runs/{build_run}").json()
    assert run["state_type"] == "COMPLETED" and "failed" in run["state"]["message"]
    artifacts = API.post(f"{api}/artifacts/filter", json={"artifacts": {
        "key": {"any_": [artifact_key("training-failed", str(tmp_path), "abc123abc123")]},  # the build of the shards
        "flow_run_id": {"any_": [build_run]}}}).json()
    assert len(artifacts) == 1 and "Training failed" in artifacts[0]["data"]


@pytest.mark.slow
def test_an_unanswered_review_applies_the_timeout_policy_after_the_deadline(deployed, tmp_path):
    """Nobody answers: Prefect fails the expired suspended run, and the follow-up run the build scheduled for
    just after the deadline applies ``accept_unflagged`` and writes the shards."""
    d, out = deployed, tmp_path / "unanswered"
    d.start_worker()
    first = d.run_on_demand(out=str(out), overrides={**SMALL, "review.timeout_s": 5, "handoff.train": False})
    d.wait_state(first, ("PAUSED",), timeout=400)
    pending = json.loads((out / "reports" / "review_pending.json").read_text())
    follow_up = d.run(pending["timeout_run_id"])
    assert abs(_epoch(follow_up["expected_start_time"]) - pending["expires_at"] - 60) < 2
    assert d.wait_state(first, ("FAILED",), timeout=120)["state"]["message"] == "The flow was paused and never resumed."
    d.wait_state(follow_up["id"], ("COMPLETED",), timeout=400)
    log = read_log(str(out))
    assert log and {(e["source"], e["reviewer"]) for e in log} == {("timeout", "policy:accept_unflagged")}
    assert list((out / "shards").glob("*.parquet")) and not (out / "reports" / "review_pending.json").exists()
