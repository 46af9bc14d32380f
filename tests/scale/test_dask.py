"""`pointvl build --dask-scheduler`: the CPU stages run on an existing Dask cluster's workers."""

from __future__ import annotations

import json
from pathlib import Path

from scale.conftest import cli, shard_tables

from pointvl.dataset.cpu_stages import STAGE_NAMES


def test_a_build_on_a_dask_cluster_equals_the_local_build_and_ran_on_its_workers(
    shapenet, config_file, reference, dask_cluster, tmp_path
):
    out = tmp_path / "run"
    result = cli("build", "--shapenet", shapenet.root, "--out", str(out), "--config", config_file,
                 "--dask-scheduler", dask_cluster["address"])
    assert result.returncode == 0, result.stderr[-3000:]
    built = shard_tables([str(p) for p in sorted((out / "shards").glob("*.parquet"))])
    assert built.keys() == reference.keys()
    for name, table in built.items():
        assert table.equals(reference[name]), name
    # every CPU stage table was written by a process of the cluster, and both workers took shards
    ran_on = set()
    for stage in STAGE_NAMES:
        for stats in (out / "stages" / stage).glob("*.stats.json"):
            ran_on.add(int(json.loads(stats.read_text())["worker"].rsplit(":", 1)[1]))
    assert ran_on == dask_cluster["worker_pids"]
    # clean's validation ran there too, leaving a cache entry per model it loaded (all but the missing OBJ)
    assert len(list((out / "cache" / "clean").rglob("*.json"))) == 3 * 5 - 1


def test_an_unreachable_scheduler_is_one_clear_line(shapenet, tmp_path):
    result = cli("build", "--shapenet", shapenet.root, "--out", str(tmp_path / "o"), "--dask-scheduler", "127.0.0.1")
    assert result.returncode == 2 and "tcp://HOST:PORT" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not Path(tmp_path / "o").exists()
