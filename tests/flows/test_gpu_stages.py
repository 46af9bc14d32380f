"""The GPU-stage flows run in-process (no deployment), on the passthrough backend."""

from __future__ import annotations

import pytest
from gpu_inputs import write_render_shard
from prefect.testing.utilities import prefect_test_harness

from flows.gpu_stages import run_gpu_stage
from pointvl.stages.base import read_stage_table
from pointvl.stages.refine import RefineConfig


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
    again = run_gpu_stage("refine", run, [0, 1], None, {"backend": "passthrough"})
    assert all(s["skipped"] for s in again)
    with pytest.raises(ValueError, match="unknown GPU stage"):
        run_gpu_stage("annotate", run, [0], None)
