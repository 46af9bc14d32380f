"""Any name a filesystem allows: `[`, `]`, `*`, `?`, `::`, spaces and unicode in --shapenet and --out.

A local path is only ever a path (never a glob, never a chained URL): each character alone through the
run folder's file operations, then all of them together through build, incremental build, temporary
file clean-up and evaluate."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fsspec.implementations.local import LocalFileSystem
from test_incremental import _add_train_model, _config

from pointvl.core import io
from pointvl.core.record import list_shards
from pointvl.dataset.runner import build_in_process, remove_temp_files

CHARACTERS = ["[", "]", "[ab]", "*", "?", "::", " ", "é", "日本", "#", "%20"]


@pytest.mark.parametrize("char", CHARACTERS)
def test_a_folder_name_with_the_character_is_a_plain_local_path(tmp_path, char):
    folder = tmp_path / f"x{char}y"
    run = str(folder / "run")
    (tmp_path / "xay").mkdir()  # what `x[ab]y` would match as a glob
    fs, path = io.filesystem(run)
    assert isinstance(fs, LocalFileSystem) and path == run  # no URL chaining at `::`, no glob expansion
    table = pa.table({"instance_id": ["a"]})
    for name in ("train-00000-of-00002.parquet", "test-00000-of-00001.parquet"):
        io.write_table(io.join(run, "shards", name), table)
    assert sorted(p.name for p in Path(run, "shards").iterdir()) == [
        "test-00000-of-00001.parquet", "train-00000-of-00002.parquet"]  # no temporary file is left
    assert io.read_table(io.join(run, "shards", "test-00000-of-00001.parquet")).equals(table)
    assert io.ls_matching(fs, f"{path}/shards", "train-00000-of-*.parquet") == [
        f"{path}/shards/train-00000-of-00002.parquet"]
    assert list_shards(io.join(run, "shards"), "test") == [f"{path}/shards/test-00000-of-00001.parquet"]
    leftover = Path(run, "shards", ".tmp-0123-train-00001-of-00002.parquet")
    leftover.write_bytes(b"cut")
    os.utime(leftover, (time.time() - 120, time.time() - 120))
    assert remove_temp_files(run) == 1 and not leftover.exists()


def test_urls_stay_urls():
    assert io.is_url("memory://run") and io.is_url("s3://bucket/run") and io.is_url("simplecache::memory://x")
    assert not io.is_url("/data/a::b") and not io.is_url("run::memory://x") and not io.is_url("a b")


def test_build_increment_and_evaluate_in_folders_with_every_character(shapenet, tmp_path):
    from pointvl.evaluation.predict_reference import write_reference
    from pointvl.evaluation.scoring import EvaluateConfig
    from pointvl.evaluation.scoring import run as evaluate

    odd = "".join(CHARACTERS)
    source, run = tmp_path / f"in {odd}" / "shapenet", tmp_path / f"out {odd}" / "run"
    shutil.copytree(shapenet.root, source)
    build_in_process(str(source), str(run), _config(), incremental=True)
    _add_train_model(source, run)  # one more train shard: every final name's -of-{n} changes
    summary = build_in_process(str(source), str(run), _config(), incremental=True)

    files = sorted((run / "shards").glob("*.parquet"))
    on_disk = sum(pq.read_metadata(f).num_rows for f in files)
    assert on_disk == summary["records"]  # no shard of the old count kept beside the new one
    assert len({f.name.rsplit("-of-", 1)[1] for f in files if f.name.startswith("train-")}) == 1
    assert not [p for p in run.rglob(".tmp-*")]
    predictions = str(tmp_path / f"pred {odd}.jsonl")
    n = write_reference("ground-truth", str(run / "shards"), predictions)
    metrics = evaluate(str(run / "shards"), predictions, str(tmp_path / f"eval {odd}.json"),
                       EvaluateConfig())  # BERTScore: not computed without its weights
    test_rows = sum(pq.read_metadata(f).num_rows for f in files if f.name.startswith("test-"))
    assert metrics["n"] == n == test_rows > 0


@pytest.mark.slow  # make test: the folder with every character builds, increments and evaluates (above)
def test_pointvl_build_and_resume_in_a_folder_with_every_character(shapenet, tmp_path):
    import subprocess
    import sys

    out = tmp_path / f"out {''.join(CHARACTERS)}"
    config = tmp_path / "c.yaml"
    config.write_text("shard_size: 8\nclean: {test_size: 0.25, train_size: null}\nrender: {width: 48, height: 48}\n"
                      "sample_points: {num_points: 256}\n")
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180"}
    for command in (["build", "--shapenet", shapenet.root, "--out", str(out), "--config", str(config)],
                    ["resume", str(out)]):
        result = subprocess.run([sys.executable, "-m", "pointvl.cli", *command], capture_output=True, text=True,
                                env=env, timeout=900)
        assert result.returncode == 0, result.stderr[-3000:]
    files = sorted((out / "shards").glob("*.parquet"))
    assert files and not list(out.rglob(".tmp-*"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.yaml", out.name]  # nothing written beside it
    assert f"resumed {out} locally" in result.stdout
