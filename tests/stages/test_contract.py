"""The stage contract, held on every stage of the DAG (diffusers' ``PipelineTesterMixin`` is the model).

A reference build of a small subset of the mini ShapeNet is made once; each test copies it and
checks one promise of :class:`pointvl.dataset.stages.base.Stage` for one stage: a finished shard is skipped
untouched; stats are written before the table; recomputing a shard gives the same table; the table
has the declared schema; a damaged input is refused in one line naming it, and nothing is written.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pointvl.core import io
from pointvl.core.errors import InputError
from pointvl.dataset.config import BuildConfig
from pointvl.dataset.dag import STAGES, make_stage
from pointvl.dataset.plan import load_plan
from pointvl.dataset.run_folder import RunFolder
from pointvl.dataset.runner import build_in_process
from pointvl.dataset.stages.base import read_stage_table
from pointvl.dataset.stages.write_shards import WriteShards

CONFIG = {"shard_size": 4, "clean": {"test_size": 2, "train_size": 2},
          "sample_points": {"num_points": 256}, "render": {"width": 48, "height": 48}}
NAMES = [s.name for s in STAGES]
SHARD = 0


@pytest.fixture(scope="module")
def reference(shapenet, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("contract") / "run"
    build_in_process(shapenet.root, str(run), BuildConfig.from_dict(CONFIG), workers=0)
    return run


@pytest.fixture
def run(reference, tmp_path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(reference, copy)
    return copy


def stage(name: str, run: Path):
    plan = load_plan(str(run))
    return make_stage(name, BuildConfig.from_dict(CONFIG), sorted({m.category for s in plan.shards for m in s.models}))


def outputs(name: str, run: Path) -> tuple[Path, Path]:
    """``(table, stats)`` of the stage's shard (write_shards: the final shard and its stats)."""
    folder = RunFolder(str(run))
    table = (folder.final_shard(load_plan(str(run)).shards[SHARD]) if name == WriteShards.name
             else folder.stage_table(name, SHARD))
    return Path(table), Path(folder.stage_stats(name, SHARD))


def table_rows(name: str, path: Path) -> list[dict]:
    rows = pq.read_table(path).to_pylist()
    if name == "review":  # when a decision was made is a record of the moment, not a computed value
        rows = [{k: v for k, v in r.items() if k != "decided_at"} for r in rows]
    return rows


@pytest.mark.parametrize("name", NAMES)
def test_a_finished_shard_is_skipped_untouched(name, run):
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()}
    stats = stage(name, run).run_shard(str(run), SHARD)
    assert stats.get("skipped") is True
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()} == before


@pytest.mark.parametrize("name", NAMES)
def test_recomputed_stats_come_first_then_the_same_table(name, run, reference, monkeypatch):
    table, stats_file = outputs(name, run)
    want = table_rows(name, table)
    table.unlink()
    stats_file.unlink()
    written: list[str] = []
    for fn in ("write_bytes", "write_json"):
        real = getattr(io, fn)
        monkeypatch.setattr(io, fn, lambda path, data, _real=real: (written.append(str(path)), _real(path, data))[1])
    stats = stage(name, run).run_shard(str(run), SHARD)
    assert str(stats_file) in written and str(table) in written
    assert written.index(str(stats_file)) < written.index(str(table))  # stats first, the table last
    assert table_rows(name, table) == want  # deterministic: the reference build made the same rows
    assert stats["instances"] == len(want) and "seconds" in stats  # the uniform count key
    if name != "review":  # review's table records the decision time; every other table is byte for byte
        assert table.read_bytes() == outputs(name, reference)[0].read_bytes()


@pytest.mark.parametrize("name", NAMES)
def test_the_table_has_the_declared_schema(name, run):
    declared = stage(name, run).schema
    table, _ = outputs(name, run)
    if name == WriteShards.name:
        assert pq.read_schema(table).remove_metadata().equals(declared.remove_metadata())
    else:
        assert read_stage_table(str(run), name, SHARD).schema.equals(declared)


@pytest.mark.parametrize("name", [s.name for s in STAGES if s.inputs])
def test_a_damaged_input_is_refused_in_one_line_and_nothing_is_written(name, run):
    first = next(s for s in stage(name, run).inputs if (run / "stages" / s / f"shard-{SHARD:05d}.parquet").exists())
    damaged = run / "stages" / first / f"shard-{SHARD:05d}.parquet"
    damaged.write_bytes(damaged.read_bytes()[: damaged.stat().st_size // 2])
    table, stats_file = outputs(name, run)
    table.unlink()
    stats_file.unlink()
    with pytest.raises((InputError, RuntimeError, FileNotFoundError)) as err:
        stage(name, run).run_shard(str(run), SHARD)
    assert "\n" not in str(err.value) and first in str(err.value), str(err.value)
    assert not table.exists() and not stats_file.exists()


@pytest.mark.parametrize("name", [s.name for s in STAGES if not s.inputs])
def test_an_unreadable_mesh_drops_its_model_with_a_reason(name, run):
    shard = load_plan(str(run)).shards[SHARD]
    assert len(shard.models) >= 2
    bad = shard.models[0]
    table, stats_file = outputs(name, run)
    table.unlink()
    stats_file.unlink()
    source = run.parent / "shapenet"  # the plan's OBJ paths are the session fixture's: point this one elsewhere
    shutil.copytree(Path(bad.obj_path).parents[1], source / bad.synset_id / bad.model_id, dirs_exist_ok=True)
    obj = source / bad.synset_id / bad.model_id / "models" / "model_normalized.obj"
    obj.write_bytes(b"\xff\xfe not an OBJ \x00")
    plan_file = Path(RunFolder(str(run)).plan)
    plan_file.write_text(plan_file.read_text().replace(bad.obj_path, str(obj)))
    stats = stage(name, run).run_shard(str(run), SHARD)
    ids = pq.read_table(table).column("instance_id").to_pylist()
    assert not any(i.startswith(f"{bad.synset_id}-{bad.model_id}-") for i in ids) and ids
    assert any(k.startswith("dropped_") for k in stats) and f"{bad.synset_id}/{bad.model_id}" in stats["drops"]
