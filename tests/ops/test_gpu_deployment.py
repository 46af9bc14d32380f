"""The GPU stage as a deployment: `run_gpu_stage` starts one flow run per GPU worker with `run_deployment`,
each over its share of the shards, and a served deployment (the stand-in for a GPU worker) runs them."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pyarrow.parquet as pq
from gpu_inputs import write_render_shard
from prefect_api import API

SERVE = textwrap.dedent("""
    from pointvl.flows.gpu_stages import refine_shards
    refine_shards.serve(name="refine", limit=1)
""")

START = textwrap.dedent("""
    import sys
    from pointvl.flows.gpu_stages import run_gpu_stage
    from pointvl.dataset.stages.refine import RefineConfig
    run_gpu_stage("refine", sys.argv[1], [0, 1], "refine-shards/refine", RefineConfig(backend="passthrough"),
                  poll_seconds=1, workers=1)
""")


def test_run_gpu_stage_gives_a_worker_one_flow_run_over_its_shards(prefect_server, tmp_path):
    run_dir = str(tmp_path / "run")
    ids = {i: write_render_shard(run_dir, i, n=2) for i in (0, 1)}
    env = {**prefect_server["env"], "PYTHONPATH": os.getcwd()}
    worker = subprocess.Popen([sys.executable, "-c", SERVE], env=env, start_new_session=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        api = prefect_server["api"]
        deadline = time.monotonic() + 90
        while API.get(f"{api}/deployments/name/refine-shards/refine").status_code != 200:
            assert worker.poll() is None and time.monotonic() < deadline, "the deployment was not served"
            time.sleep(0.5)
        result = subprocess.run([sys.executable, "-c", START, run_dir], env=env, capture_output=True, text=True,
                                timeout=240)
        assert result.returncode == 0, result.stderr[-3000:]
    finally:
        os.killpg(worker.pid, signal.SIGTERM)
        worker.wait(timeout=30)

    for i in (0, 1):
        table = pq.read_table(os.path.join(run_dir, "stages", "refine", f"shard-{i:05d}.parquet"))
        assert table.column("instance_id").to_pylist() == ids[i]
        assert {json.loads(p)["backend"] for p in table.column("refine_provenance").to_pylist()} == {"passthrough"}
    runs = API.post(f"{api}/flow_runs/filter", json={"flow_runs": {"tags": {"all_": ["stage:refine"]}}}).json()
    # one worker: one flow run (one process, so one model load) covers both shards, in order
    assert [(r["parameters"]["shard_indices"], r["state_type"]) for r in runs] == [([0, 1], "COMPLETED")]
    tasks = API.post(f"{api}/task_runs/filter", json={"flow_runs": {"id": {"any_": [runs[0]["id"]]}}}).json()
    assert sorted(t["name"] for t in tasks) == ["refine-00000", "refine-00001"]
