"""The training flow under Prefect (embedded server): stages as tasks, metrics and curves as artifacts."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent("""
    import json, sys
    from prefect.client.orchestration import get_client
    from pointvl.flows.train import train

    # nested and dotted overrides, as `pointvl train --config/--set` and the build's hand-off pass them
    overrides = {"sft": {"batch_size": 1, "per_device_batch_size": 1}, "sft.max_steps": 3,
                 "grpo": {"max_steps": 1, "num_generations": 2, "max_new_tokens": 30}, "eval_max_new_tokens": 30}
    metrics = train(sys.argv[1], sys.argv[2], preset="tiny", variant="grca", config=overrides, build_id="b123")
    with get_client(sync_client=True) as client:
        keys = sorted({a.key for a in client.read_artifacts() if a.key})
    print(json.dumps({"metrics": metrics, "artifacts": keys}))
""")


@pytest.mark.slow  # make test: the pipeline in tests/train/test_pipeline.py; a train deployment run in tests/ops
def test_train_flow_publishes_metrics_and_curves(short_shards_dir, tmp_path):
    import json

    run = str(tmp_path / "run")
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_HOME": str(tmp_path / "home"),
           "PYTHONPATH": os.getcwd()}
    result = subprocess.run([sys.executable, "-c", SCRIPT, short_shards_dir, run], capture_output=True, text=True,
                            env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert {"iou2d", "kpa3d", "rpc", "n"} <= set(out["metrics"])
    from pointvl.tasks.artifacts import artifact_key

    kinds = ("train-metrics", "training-curves", "eval-report", "train-progress")
    assert {artifact_key(kind, run, "b123") for kind in kinds} <= set(out["artifacts"])
    assert os.path.exists(os.path.join(run, "report", "report.md"))
    assert os.path.exists(os.path.join(run, "curves.png"))
    assert os.path.exists(os.path.join(run, "grpo_grca", "checkpoint-1", "model.safetensors"))
    assert json.load(open(os.path.join(run, "config.json")))["sft"]["max_steps"] == 3
