"""The build as a newcomer runs it: `pointvl build` in a subprocess, embedded Prefect."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import datasets
import numpy as np
import pyarrow.parquet as pq
import pytest

from pointvl.core.images import decode_mask
from pointvl.core.package_data import schema_path
from pointvl.core.spatial import project_points

CONFIG = """
shard_size: 8
clean: {test_size: 0.25, train_size: null}
sample_points: {num_points: 1024}
render: {width: 96, height: 96}
"""


def pointvl(*args: str, **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    return subprocess.run(
        [sys.executable, "-m", "pointvl.cli", *args], capture_output=True, text=True, env=env, timeout=600, **kwargs
    )


@pytest.fixture(scope="module")
def config_file(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("cfg") / "build.yaml"
    path.write_text(CONFIG)
    return str(path)


@pytest.fixture(scope="module")
def built(shapenet, config_file, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("build") / "run"
    result = pointvl("build", "--shapenet", shapenet.root, "--out", str(out), "--config", config_file)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "records:" in result.stdout
    return out


def _shard_files(run: Path) -> list[Path]:
    return sorted((run / "shards").glob("*.parquet"))


def test_shards_follow_the_contract(built, shapenet):
    files = _shard_files(built)
    names = [f.name for f in files]
    n_train = sum(n.startswith("train-") for n in names)
    assert f"train-00000-of-{n_train:05d}.parquet" in names and any(n.startswith("test-") for n in names)
    schema = json.loads(schema_path("record.schema.json").read_text())
    table = pq.read_table(files[0])
    assert table.column_names == list(schema["properties"])
    records = pq.read_table(files[0]).to_pylist()
    good = {m for ids in shapenet.good.values() for m in ids}
    assert {r["model_id"] for r in records} <= good
    for r in records:
        assert r["instance_id"] == f"{r['synset_id']}-{r['model_id']}-{r['view_index']}"
        assert len(r["points"]) == 1024 and len(r["kpts2d"]) == 16 and len(r["kpts3d"]) == 16
        json.loads(r["provenance"])
    assert (built / "shards" / "README.md").read_text().startswith("---")


def test_no_model_in_both_splits_and_every_good_model_built(built, shapenet):
    splits: dict[str, set[str]] = {"train": set(), "test": set()}
    for f in _shard_files(built):
        for r in pq.read_table(f, columns=["model_id", "split"]).to_pylist():
            splits[r["split"]].add(r["model_id"])
            assert f.name.startswith(r["split"])
    assert not splits["train"] & splits["test"]
    assert splits["train"] | splits["test"] == {m for ids in shapenet.good.values() for m in ids}


def test_datasets_loads_the_shards_and_decodes_images(built):
    files = [str(f) for f in _shard_files(built) if f.name.startswith("test-")]
    ds = datasets.load_dataset("parquet", data_files=files, split="train")
    row = ds[0]
    assert row["render"].size == (96, 96) and row["image"].mode == "RGB"
    assert np.asarray(row["K"]).shape == (3, 3)


def test_keypoints_project_onto_the_object(built):
    for f in _shard_files(built):
        for r in pq.read_table(f).to_pylist():
            mask = decode_mask(r["mask"]["bytes"])
            uv = project_points(np.asarray(r["kpts3d"]), np.asarray(r["K"]), np.asarray(r["R"]), np.asarray(r["t"]))
            cols, rows = np.floor(uv).astype(int).T
            assert ((cols >= 0) & (cols < 96) & (rows >= 0) & (rows < 96)).all()
            # within a pixel of the rendered silhouette (a dilation by one pixel)
            near = np.zeros_like(mask)
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    near |= np.roll(np.roll(mask, dy, 0), dx, 1)
            assert near[rows, cols].all()
            kp2 = np.asarray(r["kpts2d"])
            assert mask[np.floor(kp2[:, 1]).astype(int), np.floor(kp2[:, 0]).astype(int)].all()


@pytest.mark.slow  # skip-when-finished: every stage in tests/stages/test_contract.py; resume in tests/ops
def test_rerun_recomputes_nothing(built, shapenet, config_file):
    before = {p: p.stat().st_mtime_ns for p in built.rglob("*") if p.is_file()}
    result = pointvl("build", "--shapenet", shapenet.root, "--out", str(built), "--config", config_file)
    assert result.returncode == 0, result.stderr[-3000:]
    after = {p: p.stat().st_mtime_ns for p in built.rglob("*") if p.is_file()}
    changed = sorted(str(p.relative_to(built)) for p in after if before.get(p) != after[p])
    # only the dataset card (same content) and the record of where the latest build ran are rewritten;
    # no stage output or shard is, and the run folder's lock is gone
    assert changed == ["reports/last_build.json", "shards/README.md"], changed
    assert not (built / "build.lock").exists()


@pytest.mark.slow  # killed and resumed in make test too: on S3 (tests/scale/test_s3.py), deployed (tests/ops)
def test_sigkill_mid_build_then_resume_gives_identical_shards(built, shapenet, config_file, tmp_path):
    out = tmp_path / "killed"
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "pointvl.cli", "build", "--shapenet", shapenet.root, "--out", str(out),
         "--config", config_file],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, start_new_session=True,
    )
    deadline = time.monotonic() + 300
    while not list((out / "stages" / "render").glob("shard-*.parquet")) and time.monotonic() < deadline:
        assert proc.poll() is None, "the build ended before it could be killed"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "shards").exists() or len(_shard_files(out)) < len(_shard_files(built))

    result = pointvl("build", "--shapenet", shapenet.root, "--out", str(out), "--config", config_file)
    assert result.returncode == 0, result.stderr[-3000:]
    assert [f.name for f in _shard_files(out)] == [f.name for f in _shard_files(built)]
    for a, b in zip(_shard_files(out), _shard_files(built), strict=True):
        assert pq.read_table(a).equals(pq.read_table(b)), a.name
    # a write cut by the kill leaves at most its temporary file, which nothing reads as an output
    leftovers = list(out.rglob(".tmp-*"))
    assert len(leftovers) <= 1
    assert all(p.with_name(p.name.split("-", 2)[2]).exists() for p in leftovers)


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        ("missing", "not found"),
        ("no_taxonomy", "taxonomy.json"),
        ("unknown_category", "unknown categories"),
        ("bad_value", "shard_size"),
        ("unknown_key", "unknown keys"),
        ("wrong_type", "shard_size must be int"),
        ("out_is_a_file", "is a file"),
    ],
)
def test_bad_input_gives_one_clear_line(setup, message, shapenet, tmp_path):
    shapenet_dir, config = shapenet.root, tmp_path / "c.yaml"
    config.write_text("{}")
    if setup == "missing":
        shapenet_dir = str(tmp_path / "nowhere")
    elif setup == "no_taxonomy":
        shapenet_dir = str(tmp_path)
    elif setup == "unknown_category":
        config.write_text("clean: {categories: [spaceship]}")
    elif setup == "bad_value":
        config.write_text("shard_size: 0")
    elif setup == "wrong_type":
        config.write_text("shard_size: 2.5")
    elif setup == "out_is_a_file":
        (tmp_path / "o").write_text("not a folder")
    else:
        config.write_text("render: {widht: 64}")
    result = pointvl("build", "--shapenet", shapenet_dir, "--out", str(tmp_path / "o"), "--config", str(config))
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_a_run_folder_of_another_config_is_refused_and_kept(built, shapenet, tmp_path):
    other = tmp_path / "other.yaml"
    other.write_text(CONFIG.replace("num_points: 1024", "num_points: 2048"))
    before = {p: p.read_bytes() for p in _shard_files(built)}
    result = pointvl("build", "--shapenet", shapenet.root, "--out", str(built), "--config", str(other))
    assert result.returncode == 2 and "another input or config" in result.stderr
    assert {p: p.read_bytes() for p in _shard_files(built)} == before


RACED_BUILD = """
import sys
import pointvl.tasks.build_lock
# as if the other build took the folder just after the check
pointvl.tasks.build_lock.check_unlocked = lambda run_dir: None
from pointvl.cli import main
raise SystemExit(main(sys.argv[1:]))
"""


def test_a_build_refused_by_the_lock_inside_the_flow_exits_2_with_one_line(shapenet, config_file, tmp_path):
    from pointvl.dataset.runlock import RunLock

    out = tmp_path / "run"
    with RunLock(str(out), {"flow_run_id": "holder-run"}):
        result = subprocess.run([sys.executable, "-c", RACED_BUILD, "build", "--shapenet", shapenet.root, "--out",
                                 str(out), "--config", config_file], capture_output=True, text=True, timeout=600,
                                env={**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                                     "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180"})
    assert result.returncode == 2, result.stderr[-2000:]
    [line] = [x for x in result.stderr.splitlines() if x.startswith("pointvl build:")]
    assert "error:" in line and "is in use by flow run holder-run" in line and "Traceback" not in result.stderr
    assert not (out / "stages").exists()  # no stage ran


def test_a_build_that_lost_its_lock_while_stopped_stops_before_its_next_write(shapenet, config_file, tmp_path):
    """SIGSTOP a build past the lock's staleness, let another build take the folder, SIGCONT it: it writes
    nothing more and exits 2 with one line; the lock stays the taker's."""
    from pointvl.dataset.runlock import RunLock, read_holder

    out = tmp_path / "run"
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "POINTVL_LOCK_STALE_S": "4",
           "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180"}
    build = subprocess.Popen([sys.executable, "-m", "pointvl.cli", "build", "--shapenet", shapenet.root, "--out",
                              str(out), "--config", config_file], stderr=subprocess.PIPE, text=True, env=env,
                             start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not (out / "stages").exists() and time.monotonic() < deadline and build.poll() is None:
            time.sleep(0.1)
        os.killpg(build.pid, signal.SIGSTOP)
        time.sleep(5)  # its heartbeat goes stale
        taker = RunLock(str(out), {}, stale_after_s=4, heartbeat_s=1).acquire()
        assert taker.taken_over is not None and taker.taken_over["pid"] == build.pid
        taker.keep()  # the taker holds the folder and writes nothing
        before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and p.name != "build.lock"}
        os.killpg(build.pid, signal.SIGCONT)
        _, err = build.communicate(timeout=300)
    finally:
        if build.poll() is None:
            os.killpg(build.pid, signal.SIGKILL)
    assert build.returncode == 2, err[-3000:]
    [line] = [x for x in err.splitlines() if x.startswith("pointvl build:")]
    assert "this build's lock was taken by another build" in line
    after = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and p.name != "build.lock"}
    # no write after the stop: the finished files are as they were (a write in flight at the stop may only
    # remove its own temporary file: the fence refused its rename)
    finished = {p: t for p, t in before.items() if not p.name.startswith(".tmp-")}
    assert {p: t for p, t in after.items() if not p.name.startswith(".tmp-")} == finished
    assert read_holder(str(out))["token"] == taker.holder["token"]
