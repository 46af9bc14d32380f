"""Object storage: a build from an ``s3://`` input into an ``s3://`` run folder, through s3fs with the
endpoint from ``AWS_ENDPOINT_URL``, against a real S3 API server (moto's server mode) on loopback."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from scale.conftest import ROOT, cli, shard_tables

BUCKET = "pointvl-test"


@pytest.fixture(scope="module")
def s3_shapenet(s3, shapenet) -> str:
    s3["fs"].put(shapenet.root + "/", f"{BUCKET}/shapenet/", recursive=True)
    return f"s3://{BUCKET}/shapenet"


def _built(s3, run: str) -> dict:
    fs = s3["fs"]
    return shard_tables(sorted(fs.glob(f"{run}/shards/*.parquet")), open_file=fs.open)


@pytest.mark.slow  # make test keeps the S3 build that is killed, resumed and compared with the local one
def test_an_s3_to_s3_build_equals_the_local_build(s3, s3_shapenet, config_file, reference):
    result = cli("build", "--shapenet", s3_shapenet, "--out", f"s3://{BUCKET}/run", "--config", config_file,
                 "--workers", "2", env=s3["env"])
    assert result.returncode == 0, result.stderr[-3000:]
    built = _built(s3, f"{BUCKET}/run")
    assert built.keys() == reference.keys()
    for name, table in built.items():
        assert table.equals(reference[name]), name
    assert not s3["fs"].glob(f"{BUCKET}/run/**/.tmp-*")


def test_a_build_killed_on_s3_resumes_to_the_same_shards(s3, s3_shapenet, config_file, reference):
    fs, run = s3["fs"], f"{BUCKET}/killed"
    proc = subprocess.Popen(
        [sys.executable, "-m", "pointvl.cli", "build", "--shapenet", s3_shapenet, "--out", f"s3://{run}",
         "--config", config_file, "--workers", "2"],
        cwd=ROOT, env={**os.environ, **s3["env"]}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 300
    while not fs.glob(f"{run}/stages/render/shard-*.parquet") and time.monotonic() < deadline:
        assert proc.poll() is None, "the build ended before it could be killed"
        time.sleep(0.2)
        fs.invalidate_cache()
    os.killpg(proc.pid, signal.SIGKILL)  # the build and its worker processes
    proc.wait()
    fs.invalidate_cache()
    assert len(fs.glob(f"{run}/shards/*.parquet")) < len(reference)

    result = cli("build", "--shapenet", s3_shapenet, "--out", f"s3://{run}", "--config", config_file,
                 "--workers", "2", env=s3["env"])
    assert result.returncode == 0, result.stderr[-3000:]
    fs.invalidate_cache()
    built = _built(s3, run)
    assert built.keys() == reference.keys()
    for name, table in built.items():
        assert table.equals(reference[name]), name
