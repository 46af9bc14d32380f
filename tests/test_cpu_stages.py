"""The CPU worker: four stages through the contract's runner, each mesh read once, fresh rows handed on."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from pointvl.dataset import mesh
from pointvl.dataset.build_config import BuildConfig
from pointvl.dataset.cpu_stages import STAGE_NAMES, run_cpu_shard
from pointvl.dataset.dag import make_stage
from pointvl.dataset.plan import load_plan
from pointvl.dataset.run_folder import RunFolder
from pointvl.dataset.runner import plan_run
from pointvl.dataset.stages import base

CONFIG = BuildConfig.from_dict({"shard_size": 4, "clean": {"test_size": 2, "train_size": 2},
                                "sample_points": {"num_points": 256}, "render": {"width": 48, "height": 48}})


@pytest.fixture(scope="module")
def planned(shapenet, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("cpu") / "run"
    plan_run(shapenet.root, str(run), CONFIG)
    return run


@pytest.fixture
def run(planned, tmp_path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(planned, copy)
    return copy


@pytest.fixture
def reads(monkeypatch) -> dict[str, int]:
    """How many meshes were loaded and stage tables read (the real functions, counted)."""
    counts = {"meshes": 0, "tables": 0}
    load, read = mesh.load_model_file, base.read_stage_table

    def counted_load(path):
        counts["meshes"] += 1
        return load(path)

    def counted_read(*args):
        counts["tables"] += 1
        return read(*args)

    monkeypatch.setattr(mesh, "load_model_file", counted_load)
    monkeypatch.setattr(base, "read_stage_table", counted_read)
    return counts


def test_each_mesh_is_read_once_and_what_it_made_is_not_read_back(run, reads):
    models = len(load_plan(str(run)).shards[0].models)
    stats = run_cpu_shard(0, str(run), CONFIG)
    assert sorted(stats) == sorted(STAGE_NAMES) and not any(s.get("skipped") for s in stats.values())
    assert reads == {"meshes": models, "tables": 0}
    assert all("worker" in s for s in stats.values())
    assert "mesh_load_seconds" in stats["sample_points"] and "mesh_load_seconds" in stats["render"]
    assert "backend" in stats["render"]


def test_the_worker_writes_the_tables_each_stage_writes_alone(run, tmp_path):
    run_cpu_shard(0, str(run), CONFIG)
    alone = tmp_path / "alone"
    shutil.copytree(run, alone)
    for name in STAGE_NAMES:
        Path(RunFolder(str(alone)).stage_table(name, 0)).unlink()
    for name in STAGE_NAMES:
        assert not make_stage(name, CONFIG).run_shard(str(alone), 0).get("skipped")
    for name in STAGE_NAMES:
        assert (Path(RunFolder(str(alone)).stage_table(name, 0)).read_bytes()
                == Path(RunFolder(str(run)).stage_table(name, 0)).read_bytes()), name


def test_a_partial_shard_redoes_only_its_missing_stages(run, reads):
    run_cpu_shard(0, str(run), CONFIG)
    folder = RunFolder(str(run))
    kept = Path(folder.stage_table("kpts2d", 0)).read_bytes()
    Path(folder.stage_table("kpts2d", 0)).unlink()  # a kill after render's table, before kpts2d's
    reads.update(meshes=0, tables=0)
    stats = run_cpu_shard(0, str(run), CONFIG)
    assert [n for n, s in stats.items() if not s.get("skipped")] == ["kpts2d"]
    assert reads == {"meshes": 0, "tables": 1}  # no mesh: the masks come from render's table
    assert Path(folder.stage_table("kpts2d", 0)).read_bytes() == kept


def test_a_mesh_that_cannot_be_read_drops_its_model_from_both_mesh_stages(run):
    shard = load_plan(str(run)).shards[0]
    bad = shard.models[0]
    source = run.parent / "shapenet"  # the plan's OBJ paths are the session fixture's: point this one elsewhere
    shutil.copytree(Path(bad.obj_path).parents[1], source / bad.synset_id / bad.model_id, dirs_exist_ok=True)
    obj = source / bad.synset_id / bad.model_id / "models" / "model_normalized.obj"
    obj.write_bytes(b"\xff\xfe not an OBJ \x00")
    plan_file = Path(RunFolder(str(run)).plan)
    plan_file.write_text(plan_file.read_text().replace(bad.obj_path, str(obj)))
    stats = run_cpu_shard(0, str(run), CONFIG)
    item = f"{bad.synset_id}/{bad.model_id}"
    reasons = {name: stats[name]["drops"][item] for name in ("sample_points", "render")}
    assert reasons["sample_points"] == reasons["render"] and reasons["render"].startswith("unreadable")
