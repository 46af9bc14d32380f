"""The GPU-stage flows run in-process (no deployment), on the passthrough backend."""

from __future__ import annotations

import pytest
from gpu_inputs import write_render_shard
from prefect.testing.utilities import prefect_test_harness

from pointvl.dataset import diffusion_pipelines
from pointvl.dataset.stages.refine import RefineConfig
from pointvl.dataset.tables import read_stage_table
from pointvl.flows.gpu_stages import TASKS, refine_shards, run_gpu_stage, split_round_robin, synthesize_shards
from pointvl.testing.tiny_pipelines import tiny_refine_pipeline


@pytest.fixture(scope="module", autouse=True)
def prefect_db():
    with prefect_test_harness():
        yield


def test_run_gpu_stage_in_process_then_skips(tmp_path):
    run = str(tmp_path)
    ids = [write_render_shard(run, i, n=2) for i in (0, 1)]
    stats = run_gpu_stage("refine", run, [0, 1], None, RefineConfig(backend="passthrough"))
    assert [s["generated"] for s in stats] == [2, 2]
    stats = run_gpu_stage("synthesize", run, [0, 1], None, {"backend": "passthrough"})
    assert [s["backend"] for s in stats] == ["passthrough"] * 2
    assert read_stage_table(run, "synthesize", 1).column("instance_id").to_pylist() == ids[1]
    again = run_gpu_stage("refine", run, [0, 1], None, {"backend": "passthrough"}, workers=2)
    assert all(s["skipped"] for s in again)
    with pytest.raises(ValueError, match="unknown GPU stage"):
        run_gpu_stage("annotate", run, [0], None)
    with pytest.raises(ValueError, match="workers must be >= 1"):
        run_gpu_stage("refine", run, [0], "refine-shards/refine", workers=0)


def test_split_round_robin():
    assert split_round_robin([0, 1, 2, 3, 4], 2) == [[0, 2, 4], [1, 3]]
    assert split_round_robin([0, 1], 1) == [[0, 1]]
    assert split_round_robin([3, 5], 4) == [[3], [5]]  # never an empty flow run
    assert split_round_robin([], 3) == []


def test_stage_flows_run_their_shards_in_order_and_finish_past_a_failed_one(tmp_path, monkeypatch):
    run = str(tmp_path)
    for i in (0, 2):
        write_render_shard(run, i, n=2)
    assert [s["generated"] for s in refine_shards(run, [2, 0], {"backend": "passthrough"})] == [2, 2]
    assert [s["backend"] for s in synthesize_shards(run, [0, 2], {"backend": "passthrough"})] == ["passthrough"] * 2

    monkeypatch.setitem(TASKS, "refine", TASKS["refine"].with_options(retries=0))
    write_render_shard(run, 3, n=2)
    with pytest.raises(RuntimeError, match="refine: 1 of 2 shards failed: 1: .*FileNotFoundError"):
        refine_shards(run, [1, 3], {"backend": "passthrough"})  # shard 1 has no renders
    assert read_stage_table(run, "refine", 3).num_rows == 2  # the shard after the failed one still ran


def test_an_in_process_gpu_stage_leaves_the_device_to_the_next_one(tmp_path):
    """With ``gpu_deployments: {}`` refine and synthesize run in the build's process: each stage's
    pipeline is released when its shards are done."""
    tiny_refine_pipeline().save_pretrained(str(tmp_path / "model"))
    diffusion_pipelines.load_pipeline("refine", RefineConfig(backend="diffusers", device="cpu",
                                                             model=str(tmp_path / "model")))
    assert diffusion_pipelines._CACHE
    write_render_shard(str(tmp_path / "run"), 0, n=1)
    run_gpu_stage("refine", str(tmp_path / "run"), [0], None, {"backend": "passthrough"})
    assert not diffusion_pipelines._CACHE


def test_missing_weights_fail_the_stage_at_once_without_retries(tmp_path):
    """Missing weights will not appear on a retry: the task fails at its first try (retries wait 30 s)."""
    import time

    from pointvl.dataset.diffusion_pipelines import WeightsMissing

    write_render_shard(str(tmp_path), 0, n=1)
    start = time.monotonic()
    # `make test` sets HF_HUB_OFFLINE=1, which the message names
    missing = r"refine: backend='diffusers' but weights are not available( \(HF_HUB_OFFLINE is set\))?: no model"
    with pytest.raises(WeightsMissing, match=missing):
        run_gpu_stage("refine", str(tmp_path), [0], None,
                      {"backend": "diffusers", "device": "cpu", "model": str(tmp_path / "no-such-model")})
    assert time.monotonic() - start < 30
