"""Operations against a real Prefect server: review gate, preview server, deployment schedule, resume."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from io import BytesIO
from pathlib import Path

import httpx
import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image
from prefect_api import API

from pointvl.dataset.build_config import BuildConfig
from pointvl.dataset.handoff import build_id
from pointvl.dataset.plan import load_plan
from pointvl.dataset.run_folder import RunFolder
from pointvl.dataset.runner import plan_run
from pointvl.dataset.stages.review import MASK_BOX, items, read_log
from pointvl.dataset.tables import read_stats
from pointvl.tasks.artifacts import artifact_key

ROOT = Path(__file__).parents[2]
CONFIG = """
shard_size: 16
clean: {test_size: 0.25, train_size: null}
sample_points: {num_points: 512}
render: {width: 64, height: 64}
"""


def _start_build(env: dict, shapenet: str, out: Path, config: Path, log: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "pointvl.cli", "build", "--shapenet", shapenet, "--out", str(out), "--config",
         str(config)], env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True,
    )


def _wait_for(predicate, proc: subprocess.Popen, log: Path, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"build exited ({proc.returncode}) early:\n{log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out; build log:\n{log.read_text()[-3000:]}")
        time.sleep(0.2)


def _records(out: Path) -> list[dict]:
    return [r for f in sorted((out / "shards").glob("*.parquet"))
            for r in pq.read_table(f, columns=["instance_id", "provenance"]).to_pylist()]


@pytest.mark.slow  # make test: the deployed review (tests/ops/test_deployed.py)
def test_build_pauses_for_review_and_the_rejected_item_never_reaches_the_shards(
    prefect_server, free_port, shapenet, tmp_path
):
    api, env = prefect_server["api"], prefect_server["env"]
    config = tmp_path / "build.yaml"
    config.write_text(CONFIG + f"review: {{gate: 'on', poll_s: 1, timeout_s: 600, preview_port: {free_port()}}}\n")
    out, log = tmp_path / "run", tmp_path / "build.log"
    build = _start_build(env, shapenet.root, out, config, log)
    try:
        pending_file = out / "reports" / "review_pending.json"
        _wait_for(pending_file.exists, build, log)
        pending = json.loads(pending_file.read_text())
        run_id = pending["flow_run_id"]
        _wait_for(lambda: API.get(f"{api}/flow_runs/{run_id}").json()["state"]["type"] == "PAUSED", build, log, 60)

        # The preview server returns the contact sheet the build wrote.
        _wait_for(lambda: "page" in json.loads(pending_file.read_text()), build, log, 60)
        page = json.loads(pending_file.read_text())["page"]
        url = page["sheet"]
        response = httpx.get(url, timeout=10)
        assert response.status_code == 200 and response.headers["content-type"] == "image/png"
        assert response.content == (out / "previews" / "review-shard-00000-page-000.png").read_bytes()
        assert Image.open(BytesIO(response.content)).size[0] > 3 * 160

        # ... shown as an image artifact of this run and in the form's description.
        key = artifact_key("review-shard-00000-page-000", str(out), build_id(str(out)))  # per folder and build
        artifacts = API.post(f"{api}/artifacts/filter", json={
            "artifacts": {"key": {"any_": [key]}, "flow_run_id": {"any_": [run_id]}}}).json()
        assert [(a["type"], a["data"]) for a in artifacts] == [("image", url)]
        inputs = API.post(f"{api}/flow_runs/{run_id}/input/filter",
                          json={"prefix": f"paused-{page['key']}-", "limit": 20}).json()
        description = next(json.loads(i["value"]) for i in inputs if i["key"].endswith("-description"))
        assert f"]({url})" in description

        if shutil.which("chromium"):  # the UI's artifact page of the paused run renders the sheet
            shot = tmp_path / "paused_review.png"
            subprocess.run(
                ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                 f"--screenshot={shot}", "--window-size=1400,1400", "--virtual-time-budget=20000",
                 f"{prefect_server['ui']}/artifacts/artifact/{artifacts[0]['id']}"],
                capture_output=True, timeout=90, check=False,
            )
            pixels = np.asarray(Image.open(shot).convert("RGB")).reshape(-1, 3)
            assert (pixels == MASK_BOX).all(axis=1).sum() > 100, f"no contact sheet in {shot}"

        # Answer the form through the API (`pointvl review` → resume_flow_run), rejecting one item.
        rejected = items(str(out), 0)[0].instance_id
        answer = subprocess.run(
            [sys.executable, "-m", "pointvl.cli", "review", str(out), "--reject", f"{rejected}:wrong pose",
             "--reviewer", "alice"], env=env, capture_output=True, text=True, timeout=60, cwd=ROOT,
        )
        assert answer.returncode == 0, answer.stderr
        # ... then the next page (shard 1) comes; `--approve-all` approves it and the rest of the build.
        _wait_for(lambda: json.loads(pending_file.read_text())["page"]["key"] != page["key"], build, log, 120)
        rest = subprocess.run([sys.executable, "-m", "pointvl.cli", "review", str(out), "--approve-all", "--reviewer",
                               "alice"], env=env, capture_output=True, text=True, timeout=60, cwd=ROOT)
        assert rest.returncode == 0, rest.stderr
        assert build.wait(timeout=240) == 0, log.read_text()[-3000:]
    finally:
        if build.poll() is None:
            os.killpg(build.pid, signal.SIGKILL)

    records = _records(out)
    ids = {r["instance_id"] for r in records}
    assert rejected not in ids and {it.instance_id for it in items(str(out), 0)} - {rejected} <= ids
    review = json.loads(records[0]["provenance"])["review"]
    assert (review["reviewer"], review["decision"]) == ("alice", "approved")
    logged = [e for e in read_log(str(out)) if e["instance_id"] == rejected]
    assert [(e["decision"], e["reason"], e["reviewer"], e["source"]) for e in logged] == [
        ("rejected", "wrong pose", "alice", "cli")]
    assert logged[0]["decided_at"] and not (out / "reports" / "review_pending.json").exists()
    assert API.get(f"{api}/flow_runs/{run_id}").json()["state"]["type"] == "COMPLETED"


@pytest.mark.slow  # make test: the cron fires on a real server (tests/ops/test_deployed.py)
def test_the_scheduled_deployment_carries_the_cron_schedule(prefect_server):
    env = {**prefect_server["env"], "POINTVL_ROOT": str(ROOT), "POINTVL_BUILD_CRON": "17 3 * * 1",
           "POINTVL_SHAPENET": "/data/ShapeNetCore.v2", "POINTVL_OUT": "/data/gr3d"}
    prefect = prefect_server["prefect"]
    for pool in ("cpu", "gpu"):
        subprocess.run([prefect, "work-pool", "create", pool, "--type", "process", "--overwrite"], env=env,
                       check=True, capture_output=True, timeout=60)
    deploy = subprocess.run([prefect, "--no-prompt", "deploy", "--name", "scheduled"], env=env, cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert deploy.returncode == 0, deploy.stdout[-3000:] + deploy.stderr[-3000:]
    d = API.get(f"{prefect_server['api']}/deployments/name/build-benchmark/scheduled").json()
    assert [s["schedule"]["cron"] for s in d["schedules"]] == ["17 3 * * 1"]
    assert (d["work_pool_name"], d["entrypoint"]) == ("cpu", "flows/build.py:build_benchmark")
    assert d["parameters"]["out"] == "/data/gr3d" and d["parameters"]["config"]["review"]["gate"] == "auto"
    BuildConfig.from_dict(d["parameters"]["config"])  # the deployed config is a valid build config


@pytest.mark.slow  # per-item GPU resume after a kill is in make test: tests/ops/test_deployed.py
def test_a_build_whose_gpu_stage_fails_resumes_without_redoing_finished_items(prefect_server, shapenet, tmp_path):
    """The synthesize stage of shard 1 stops after all but one item (a FIFO stands in for that item's
    file, so the stage blocks reading it back); the build is killed there, as a lost GPU worker
    would be. ``pointvl resume`` then finishes it, regenerating only that one item."""
    env = prefect_server["env"]
    config = tmp_path / "build.yaml"
    config.write_text(CONFIG)
    out, log = tmp_path / "run", tmp_path / "build.log"
    plan_run(shapenet.root, str(out), BuildConfig.from_file(str(config)))  # fix the plan to know shard 1's ids
    shard = load_plan(str(out)).shards[1]
    ids = shard.instance_ids()
    folder = Path(RunFolder.of(str(out)).stage_items("synthesize", 1))
    folder.mkdir(parents=True)
    blocker = folder / f"{ids[-1]}.parquet"
    os.mkfifo(blocker)
    build = _start_build(env, shapenet.root, out, config, log)
    try:
        _wait_for(lambda: len(list(folder.glob("*.parquet"))) == len(ids), build, log)
        time.sleep(1.0)  # the stage is now blocked on the FIFO
    finally:
        os.killpg(build.pid, signal.SIGKILL)
        build.wait()
    assert not (out / "stages" / "synthesize" / "shard-00001.parquet").exists()
    finished = {p: p.stat().st_mtime_ns for p in (out / "stages").rglob("shard-*.parquet") if p.is_file()}
    assert out / "stages" / "synthesize" / "shard-00000.parquet" in finished
    item_files = {p: p.stat().st_mtime_ns for p in folder.glob("*.parquet") if p != blocker}
    blocker.unlink()

    resume = subprocess.run([sys.executable, "-m", "pointvl.cli", "resume", str(out)], env=env, cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert resume.returncode == 0, resume.stdout[-2000:] + resume.stderr[-3000:]
    assert {p: p.stat().st_mtime_ns for p in finished} == finished  # no finished shard of any stage redone
    stats = read_stats(str(out), "synthesize", 1)
    assert (stats["generated"], stats["resumed"]) == (1, len(ids) - 1) == (1, len(item_files))
    records = _records(out)
    assert set(ids) <= {r["instance_id"] for r in records}
    assert len(list((out / "shards").glob("*.parquet"))) == len(load_plan(str(out)).shards)


def test_preview_server_serves_only_its_folder(tmp_path):
    from pointvl.dataset.preview import PreviewServer

    (tmp_path / "previews").mkdir()
    (tmp_path / "previews" / "a.png").write_bytes(b"\x89PNG sheet")
    (tmp_path / "secret.txt").write_text("no")
    with PreviewServer(str(tmp_path / "previews"), port=0) as server:
        url = server.url_for("a.png")
        assert httpx.get(url).content == b"\x89PNG sheet"
        assert httpx.get(server.url_for("../secret.txt")).status_code == 404
    with pytest.raises(httpx.TransportError):
        httpx.get(url, timeout=2)
