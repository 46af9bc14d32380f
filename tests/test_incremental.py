"""Incremental builds: one run folder follows new models and config changes, recomputing only what they affect."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pointvl.dataset.config import BuildConfig
from pointvl.dataset.dag import TABLE_STAGES
from pointvl.dataset.plan import ModelEntry, PlanMismatchError, extend_plan, load_plan, make_plan
from pointvl.dataset.runner import build_in_process
from pointvl.dataset.stages.base import read_stats
from pointvl.dataset.stages.clean import _split_key

CONFIG = {"shard_size": 8, "clean": {"test_size": 3, "train_size": None},
          "sample_points": {"num_points": 256}, "render": {"width": 48, "height": 48}}


def _config(**render) -> BuildConfig:
    return BuildConfig.from_dict({**CONFIG, "render": {**CONFIG["render"], **render}})


@pytest.fixture
def built(shapenet, tmp_path) -> tuple[Path, Path]:
    """A writable copy of the mini ShapeNet and an incremental build of it: ``(shapenet, run)``."""
    source, run = tmp_path / "shapenet", tmp_path / "run"
    shutil.copytree(shapenet.root, source)
    build_in_process(str(source), str(run), _config(), incremental=True)
    return source, run


def _mtimes(run: Path, pattern: str) -> dict[str, int]:
    return {str(p.relative_to(run)): p.stat().st_mtime_ns for p in run.glob(pattern) if p.is_file()}


def _records(run: Path) -> list[dict]:
    columns = ["instance_id", "model_id", "split", "width"]
    files = sorted((run / "shards").glob("*.parquet"))
    return [r for f in files for r in pq.read_table(f, columns=columns).to_pylist()]


def _add_train_model(source: Path, run: Path) -> str:
    """Copy a kept model to a new id, its mesh flattened along y (a uniformly scaled copy is the same shape,
    dropped as duplicate geometry).

    The id is chosen to land in train without moving any model between splits (the split takes the
    ``test_size`` smallest split keys), so only the new model's work is new.
    """
    kept = [m for s in load_plan(str(run)).shards for m in s.models]
    last_test = max(_split_key(0, m.model_id) for m in kept if m.split == "test")
    new_id = next(h for k in range(1000) if _split_key(0, h := hashlib.md5(str(k).encode()).hexdigest()) > last_test)
    src = source / kept[0].synset_id / kept[0].model_id
    dst = source / kept[0].synset_id / new_id
    shutil.copytree(src, dst)
    obj = dst / "models" / "model_normalized.obj"
    lines = [f"v {' '.join(str(s * float(x)) for s, x in zip((1, 0.9, 1), line.split()[1:4], strict=True))}"
             if line.startswith("v ") else line for line in obj.read_text().splitlines()]
    obj.write_text("\n".join(lines) + "\n")
    return new_id


def test_extend_plan_keeps_every_shard_in_place():
    models = [ModelEntry("s", f"m{i}", "car", "train" if i < 6 else "test", f"/{i}.obj", f"g{i}") for i in range(8)]
    old = make_plan(models, shard_size=2, views_per_model=1, fingerprint="a")
    changed = [m for m in models if m.model_id != "m1"]  # m1 removed
    changed[1] = ModelEntry("s", "m2", "car", "train", "/2.obj", "g2-new")  # m2's mesh changed
    changed[2] = ModelEntry("s", "m3", "car", "test", "/3.obj", "g3")  # m3 moved to test
    changed.append(ModelEntry("s", "m9", "car", "train", "/9.obj", "g9"))
    plan = extend_plan(old, changed, shard_size=2, views_per_model=1, fingerprint="b")

    ids = {s.final_name: [m.model_id for m in s.models] for s in plan.shards}
    assert ids == {
        "train-00000-of-00004.parquet": ["m0"],
        "train-00001-of-00004.parquet": ["m2"],
        "train-00002-of-00004.parquet": ["m4", "m5"],
        "test-00000-of-00002.parquet": ["m6", "m7"],
        "train-00003-of-00004.parquet": ["m9"],
        "test-00001-of-00002.parquet": ["m3"],
    }
    assert [s.index for s in plan.shards] == list(range(6)) and plan.fingerprint == "b"
    assert plan.shards[1].models[0].geometry == "g2-new"
    assert plan.shards[2:4] == tuple(dataclasses.replace(s, split_count=n)
                                     for s, n in zip(old.shards[2:4], (4, 2), strict=True))
    assert extend_plan(plan, changed, 2, 1, "b") == plan


def test_a_new_model_builds_only_its_own_shard(built):
    source, run = built
    plan_before = load_plan(str(run))
    tables_before = _mtimes(run, "stages/*/shard-*")
    shards_before = {f.name.rsplit("-of-", 1)[0]: f.read_bytes() for f in (run / "shards").glob("*.parquet")}
    new_id = _add_train_model(source, run)

    build_in_process(str(source), str(run), _config(), incremental=True)

    plan = load_plan(str(run))
    old_n = len(plan_before.shards)
    assert [dataclasses.replace(s, split_count=0) for s in plan.shards[:old_n]] == [
        dataclasses.replace(s, split_count=0) for s in plan_before.shards]  # only the -of-{n} may change
    assert [[m.model_id for m in s.models] for s in plan.shards[old_n:]] == [[new_id]]
    assert {k: v for k, v in _mtimes(run, "stages/*/shard-*").items() if k in tables_before} == tables_before
    assert all((run / "stages" / stage / f"shard-{old_n:05d}.parquet").is_file() for stage in TABLE_STAGES)
    assert read_stats(str(run), "render", old_n)["instances"] == 1  # the new model's one view, nothing more
    assert not (run / "superseded").exists()
    # existing final shards were renamed to the new split count, not rewritten
    shards_after = {f.name.rsplit("-of-", 1)[0]: f for f in (run / "shards").glob("*.parquet")}
    assert {k: shards_after[k].read_bytes() for k in shards_before} == shards_before
    assert sorted(f.name for f in shards_after.values()) == sorted(s.final_name for s in plan.shards)

    records = _records(run)
    assert new_id in {r["model_id"] for r in records}
    assert len({r["instance_id"] for r in records}) == len(records)
    splits = {split: {r["model_id"] for r in records if r["split"] == split} for split in ("train", "test")}
    assert not splits["train"] & splits["test"]


def test_a_changed_render_config_recomputes_render_and_what_reads_it(built):
    source, run = built
    before = _mtimes(run, "stages/*/shard-*.parquet")

    build_in_process(str(source), str(run), _config(width=40), incremental=True)

    after = _mtimes(run, "stages/*/shard-*.parquet")
    assert after.keys() == before.keys()
    upstream = ("sample_points", "geometry")
    for path, mtime in after.items():
        stage = path.split("/")[1]
        assert (mtime == before[path]) == (stage in upstream), path
    superseded = next((run / "superseded").iterdir())
    moved = {str(p.relative_to(superseded)) for p in superseded.rglob("*.parquet")}
    old_finals = {f"shards/{s.final_name}" for s in load_plan(str(run)).shards}
    assert moved == {p for p in before if p.split("/")[1] not in upstream} | old_finals
    assert {r["width"] for r in _records(run)} == {40}


def test_a_rebuild_with_nothing_changed_recomputes_nothing(built):
    source, run = built
    before = _mtimes(run, "**/*")
    summary = build_in_process(str(source), str(run), _config(), incremental=True)
    after = _mtimes(run, "**/*")
    changed = sorted(p for p in after if before.get(p) != after[p])
    # cleaning runs again (it must, to see new models); no plan, key, stage output or shard is rewritten
    assert changed == ["config.json", "reports/cleaning.csv", "shards/README.md"], changed
    assert summary["records"] == len(_records(run))


def test_a_changed_config_is_still_refused_without_incremental(built):
    source, run = built
    before = _mtimes(run, "**/*")
    with pytest.raises(PlanMismatchError, match="another input or config"):
        build_in_process(str(source), str(run), _config(width=40))
    assert _mtimes(run, "**/*") == before


@pytest.mark.slow  # the deployed scheduled build is incremental in make test (tests/ops/test_deployed.py)
def test_cli_incremental_updates_a_run_folder(built, tmp_path):
    source, run = built
    config = tmp_path / "wider.yaml"
    config.write_text(json.dumps({**CONFIG, "render": {"width": 40, "height": 48}}))
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    result = subprocess.run(
        [sys.executable, "-m", "pointvl.cli", "build", "--shapenet", str(source), "--out", str(run),
         "--config", str(config), "--incremental"],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert {r["width"] for r in _records(run)} == {40}
    assert (run / "superseded").is_dir()
