"""Real services for the scale tests, on loopback and free ports: a Dask cluster (``dask scheduler`` +
two ``dask worker`` processes) and an S3 API server (moto's server mode); and the local build the
tests compare against."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pyarrow.parquet as pq
import pytest
from ports import free_port

from pointvl.dataset.build_config import BuildConfig
from pointvl.dataset.runner import build_in_process

ROOT = Path(__file__).parents[2]
BIN = Path(sys.executable).parent
# three categories with a missing OBJ, a face-less mesh and a duplicate among them; four shards
CONFIG = """
shard_size: 4
clean: {test_size: 0.25, train_size: null, categories: [mug, car, airplane]}
sample_points: {num_points: 256}
render: {width: 48, height: 48}
"""


def cli(*args: str, env: dict | None = None, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pointvl.cli", *args], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, **(env or {})}, timeout=600, **kwargs)


def shard_tables(files: list[str], open_file=open) -> dict[str, object]:
    """Final shard name -> its table."""
    out = {}
    for path in files:
        with open_file(path, "rb") as f:
            out[path.rsplit("/", 1)[1]] = pq.read_table(f)
    return out


def _stop(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture(scope="session")
def config_file(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("scale_cfg") / "build.yaml"
    path.write_text(CONFIG)
    return str(path)


@pytest.fixture(scope="session")
def reference(shapenet, config_file, tmp_path_factory) -> dict:
    """The plain local build (one worker process): ``{shard name: table}``."""
    run = tmp_path_factory.mktemp("reference") / "run"
    summary = build_in_process(shapenet.root, str(run), BuildConfig.from_file(config_file), workers=1)
    return shard_tables(summary["shard_files"])


@pytest.fixture(scope="session")
def dask_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """``{"address": "tcp://127.0.0.1:PORT", "worker_pids": {pid, pid}}``; the workers import this checkout."""
    from distributed import Client

    logs = tmp_path_factory.mktemp("dask")
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    common = {"env": env, "cwd": logs, "stderr": subprocess.STDOUT, "start_new_session": True}
    procs = [subprocess.Popen([str(BIN / "dask"), "scheduler", "--host", "127.0.0.1", "--port", str(port),
                               "--no-dashboard"], stdout=(logs / "scheduler.log").open("wb"), **common)]
    try:
        procs += [subprocess.Popen([str(BIN / "dask"), "worker", address, "--nthreads", "1", "--no-nanny",
                                    "--no-dashboard", "--host", "127.0.0.1", "--name", f"w{i}"],
                                   stdout=(logs / f"worker{i}.log").open("wb"), **common) for i in range(2)]
        with Client(address, timeout="60s") as client:
            client.wait_for_workers(2, timeout=120)
            pids = set(client.run(os.getpid).values())
        yield {"address": address, "worker_pids": pids, "logs": logs}
    finally:
        _stop(procs)


@pytest.fixture(scope="session")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """An S3 API server (``moto_server``) with bucket ``pointvl-test``; ``{"env", "fs"}``: the standard AWS
    variables that point clients at it, and an s3fs filesystem on it."""
    import s3fs

    logs = tmp_path_factory.mktemp("moto")
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=(logs / "moto.log").open("wb"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                httpx.get(endpoint, timeout=2)
                break
            except httpx.TransportError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    log = (logs / "moto.log").read_text()[-2000:]
                    raise RuntimeError(f"moto_server did not start: {log}") from None
                time.sleep(0.3)
        env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
               "AWS_DEFAULT_REGION": "us-east-1"}
        fs = s3fs.S3FileSystem(key="testing", secret="testing", endpoint_url=endpoint, skip_instance_cache=True)
        fs.mkdir("pointvl-test")
        yield {"env": env, "fs": fs}
    finally:
        _stop([proc])
