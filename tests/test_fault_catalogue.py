"""The fault catalogue: a fixture with every known fault builds, each fault costs only itself and is
reported with its reason, and damaged run state is detected, moved aside and recomputed.

Faults tested beside their code: the run-folder lock under races, pauses, full disks and pid reuse
(tests/test_runlock.py), signals (tests/test_interrupt.py), `[`, `*`, `::`... in paths
(tests/test_odd_paths.py), a key echoed by the server and a VLM outage (tests/stages/test_annotate.py),
a shape in other formats (tests/stages/test_clean.py), a second build refused inside the flow
(tests/flows/test_build.py)."""

from __future__ import annotations

import csv
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pointvl.dataset.build_config import BuildConfig
from pointvl.dataset.plan import load_plan
from pointvl.dataset.run_folder import RunFolder
from pointvl.dataset.runner import build_in_process, plan_run
from pointvl.dataset.stages.base import Drops
from pointvl.dataset.stages.write_shards import WriteShards, WriteShardsConfig
from pointvl.dataset.summary import dataset_card, format_summary, summarize
from pointvl.dataset.tables import read_stage_table, read_stats, write_stage_table
from pointvl.fixture import FixtureManifest, write_fixture

CONFIG = {"shard_size": 8, "clean": {"test_size": 0.25, "train_size": None},
          "sample_points": {"num_points": 256}, "render": {"width": 32, "height": 32}}


@pytest.fixture(scope="module")
def catalogue(tmp_path_factory: pytest.TempPathFactory) -> FixtureManifest:
    return write_fixture(str(tmp_path_factory.mktemp("catalogue") / "shapenet"), seed=0, catalogue=True)


@pytest.fixture(scope="module")
def built(catalogue: FixtureManifest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    run = tmp_path_factory.mktemp("built") / "run"
    summary = build_in_process(catalogue.root, str(run), BuildConfig.from_dict(CONFIG))
    return run, summary


def _records(run: Path) -> list[dict]:
    return [r for f in sorted((run / "shards").glob("*.parquet"))
            for r in pq.read_table(f, columns=["model_id", "synset_id", "bbox3d", "provenance"]).to_pylist()]


def _report(run: Path) -> dict[tuple[str, str], dict]:
    with open(run / "reports" / "cleaning.csv") as f:
        return {(r["synset_id"], r["model_id"]): r for r in csv.DictReader(f)}


def test_every_fault_is_reported_with_its_reason_and_everything_else_builds(catalogue, built):
    run, summary = built
    report = _report(run)
    for fault in catalogue.faults:
        assert (report[fault.synset_id, fault.model_id]["status"], report[fault.synset_id, fault.model_id]["reason"]) \
            == ("dropped", fault.reason), fault
        assert summary["dropped"][f"clean:{fault.reason}"] >= 1
        assert f"| clean:{fault.reason} |" in (run / "shards" / "README.md").read_text()
    built_models = {r["model_id"] for r in _records(run)}
    quirky = {key.split("/")[1] for key in catalogue.quirks}
    good = {m for ids in catalogue.good.values() for m in ids}
    assert quirky <= good and built_models == good  # every real-world OBJ builds, no faulty one does
    assert summary["records"] == len(good)


def test_models_in_other_units_are_normalized_and_say_so(catalogue, built):
    run, _ = built
    mm = next(k.split("/")[1] for k, q in catalogue.quirks.items() if q == "millimetres")
    by_model = {r["model_id"]: r for r in _records(run)}
    mesh = json.loads(by_model[mm]["provenance"])["mesh"]
    assert mesh["normalized"] and mesh["scale"] == pytest.approx(0.001, rel=0.2)
    assert "normalized like model_normalized" in next(r["note"] for r in _report(run).values() if r["model_id"] == mm)
    box = np.asarray(by_model[mm]["bbox3d"])
    assert np.linalg.norm(box[3:] - box[:3]) == pytest.approx(1.0, abs=0.05)  # the sampled cloud is unit-sized
    assert np.abs(box).max() < 0.6
    plain = next(m for m in by_model if m not in {k.split("/")[1] for k in catalogue.quirks})
    assert json.loads(by_model[plain]["provenance"])["mesh"] == {"normalized": False}


def test_damaged_run_state_is_moved_aside_recomputed_and_named(catalogue, built, tmp_path, caplog):
    run, _ = built
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    plan = load_plan(str(copy))
    finals = {p.name: p.read_bytes() for p in (copy / "shards").glob("*.parquet")}
    stages = copy / "stages"
    # 1. a valid table of another shard copied over shard 0's render table
    shutil.copy(stages / "render" / "shard-00001.parquet", stages / "render" / "shard-00000.parquet")
    # 2. 16 bytes flipped inside a points table
    points = stages / "sample_points" / "shard-00002.parquet"
    data = bytearray(points.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 16] = bytes(b ^ 0xFF for b in data[middle:middle + 16])
    points.write_bytes(bytes(data))
    # 3. a half-length table, 4. a deleted stats JSON
    geometry = stages / "geometry" / "shard-00003.parquet"
    geometry.write_bytes(geometry.read_bytes()[: geometry.stat().st_size // 2])
    (stages / "kpts2d" / "shard-00004.stats.json").unlink()
    # 5. a half-length final shard, 6. a temporary file left by a killed write
    final = copy / "shards" / plan.shards[5].final_name
    final.write_bytes(final.read_bytes()[: final.stat().st_size // 2])
    leftover = stages / "render" / ".tmp-0123abcd-shard-00006.parquet"
    leftover.write_bytes(b"cut")
    os.utime(leftover, (leftover.stat().st_atime - 120, leftover.stat().st_mtime - 120))  # left minutes ago

    caplog.set_level(logging.WARNING)
    build_in_process(catalogue.root, str(copy), BuildConfig.from_dict(CONFIG))
    warnings = caplog.text
    for name, why in [("stages/render/shard-00000.parquet", "checksum"),
                      ("stages/sample_points/shard-00002.parquet", "checksum"),
                      ("stages/geometry/shard-00003.parquet", "checksum"),
                      ("stages/kpts2d/shard-00004.parquet", "stats file is missing"),
                      (f"shards/{plan.shards[5].final_name}", "checksum")]:
        line = next((ln for ln in warnings.splitlines() if name in ln), "")
        assert why in line and "moved to superseded/" in line, (name, warnings)
        assert list((copy / "superseded").glob(f"*/{name}")), name  # moved aside, never deleted
    assert {p.name: p.read_bytes() for p in (copy / "shards").glob("*.parquet")} == finals
    assert not list(copy.rglob(".tmp-*"))


def test_a_stale_or_foreign_table_is_refused_when_read(built, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(built[0], run)
    table = read_stage_table(str(run), "render", 1)
    write_stage_table(str(run), "render", 0, table, read_stats(str(run), "render", 1))  # stats and table of shard 1
    bad = run / "stages" / "render" / "shard-00000.parquet"
    bad.write_bytes((run / "stages" / "render" / "shard-00001.parquet").read_bytes())
    (run / "stages" / "render" / "shard-00000.stats.json").write_text(
        (run / "stages" / "render" / "shard-00001.stats.json").read_text())
    with pytest.raises(ValueError, match="made for render shard 1"):
        read_stage_table(str(run), "render", 0)
    # kpts2d of shard 1 was made from the render table that is there; once render changes it is stale
    write_stage_table(str(run), "render", 1, table.slice(0, 2), {})
    with pytest.raises(ValueError, match="its input, the render table, has changed"):
        read_stage_table(str(run), "kpts2d", 1)


def test_a_mesh_that_breaks_after_planning_is_dropped_by_each_stage(catalogue, tmp_path):
    shapenet = tmp_path / "shapenet"
    shutil.copytree(catalogue.root, shapenet, symlinks=True)
    run = str(tmp_path / "run")
    cfg = BuildConfig.from_dict({**CONFIG, "clean": {**CONFIG["clean"], "categories": ["mug", "car"]}})
    plan = plan_run(str(shapenet), run, cfg)
    victim = plan.shards[0].models[0]
    Path(victim.obj_path).write_bytes(b"v 0 0 0\nf 1 2 3\n\x00\x00 junk")  # replaced mid-build
    summary = build_in_process(str(shapenet), run, cfg)
    assert summary["dropped"]["sample_points:unreadable"] == 1 and summary["dropped"]["render:unreadable"] == 1
    drops = read_stats(run, "render", 0)["drops"]
    assert list(drops) == [f"{victim.synset_id}/{victim.model_id}"] and "binary" in drops[list(drops)[0]]
    assert victim.model_id not in {r["model_id"] for r in _records(Path(run))}
    assert summary["records"] == sum(len(s.models) for s in plan.shards) - 1


def test_an_item_error_drops_the_item_but_an_error_of_every_item_fails_the_shard():
    drops = Drops("render")
    kept = []
    for item in ("a", "b", "c"):
        with drops.guard(item):
            if item == "b":
                raise ZeroDivisionError("division by zero")
            kept.append(item)
    assert kept == ["a", "c"] and drops.stats()["dropped_render_failed"] == 1
    drops.check(3)
    with pytest.raises(OSError), drops.guard("d"):  # storage faults are the run's, not the item's
        raise OSError("disk full")
    everything = Drops("render")
    for item in ("a", "b"):
        with everything.guard(item):
            raise RuntimeError("no CUDA device")
    with pytest.raises(RuntimeError, match="all 2 items failed"):
        everything.check(2)


def test_failed_annotations_are_counted_with_the_command_that_retries_them(built, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(built[0], run)
    table = read_stage_table(str(run), "annotate", 0)
    n = table.num_rows
    status = table.column_names.index("annotate_status")
    failed = table.set_column(status, "annotate_status", pa.array(["failed"] * n))
    failed = failed.set_column(failed.column_names.index("annotate_failure_reason"), "annotate_failure_reason",
                               pa.array(["qa: invalid reply after 3 attempts: schema violation"] * n))
    stats = {**read_stats(str(run), "annotate", 0), "failed": n, "ok": 0, "failed_qa": n}
    write_stage_table(str(run), "annotate", 0, failed, stats, inputs=("render", "geometry", "kpts2d"))
    # the final shard of shard 0 joined the old annotations: it is rebuilt without the failed items
    assert not WriteShards().finished(str(run), 0)
    WriteShards(WriteShardsConfig()).run_shard(str(run), 0)
    summary = summarize(str(run))
    assert summary["annotate_failed"]["items"] == n and summary["annotate_failed"]["qa"] == n
    assert summary["dropped"]["write_shards:annotate_failed"] == n
    for text in (format_summary(summary), dataset_card(summary)):
        assert f"annotation failed: {n} items (qa {n})" in text and "--redo-failed" in text


def test_a_damaged_plan_and_a_run_fault_each_give_one_line(catalogue, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "plan.json").write_bytes(b"\x89garbage\xff{")
    result = subprocess.run([sys.executable, "-m", "pointvl.cli", "build", "--shapenet", catalogue.root,
                             "--out", str(run)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert "plan.json is damaged" in result.stderr and "move it away and re-run" in result.stderr


def test_a_fault_of_the_run_exits_1_with_one_line(catalogue, tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(json.dumps(CONFIG))
    result = subprocess.run([sys.executable, "-m", "pointvl.cli", "build", "--shapenet", catalogue.root,
                             "--out", "/dev/null/run", "--config", str(config)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    # one line names the cause (Prefect's temporary server may log its shutdown after it)
    lines = [ln for ln in result.stderr.splitlines() if ln.startswith("pointvl build: failed:")]
    assert len(lines) == 1 and "NotADirectoryError" in lines[0] and "/dev/null" in lines[0], result.stderr[-2000:]


def test_a_table_of_an_earlier_pointvl_is_adopted_if_it_reads_and_moved_aside_if_not(tmp_path):
    from pointvl.core import io
    from pointvl.dataset.tables import finished

    run = str(tmp_path)
    folder = RunFolder.of(run)
    table = pa.table({"instance_id": ["a-b-0"], "x": [1.0]})
    for shard, data in ((0, io.table_bytes(table)), (1, io.table_bytes(table)[:40])):
        io.write_bytes(folder.stage_table("geometry", shard), data)
        io.write_json(folder.stage_stats("geometry", shard), {"instances": 1})  # no checksum: written before them
    assert finished(run, "geometry", 0) and "table_sha256" in read_stats(run, "geometry", 0)
    assert read_stage_table(run, "geometry", 0).equals(table)
    assert not finished(run, "geometry", 1) and list(tmp_path.glob("superseded/*/stages/geometry/shard-00001.parquet"))


def test_a_one_category_build_gets_a_distractor_for_its_category_question(tmp_path):
    from pointvl.dataset.annotation_config import AnnotateConfig
    from pointvl.dataset.stages.annotate import Annotate

    assert Annotate(AnnotateConfig(), ["chair"]).categories == ["airplane", "chair"]


def test_a_gpu_stage_item_that_fails_alone_is_dropped_and_a_device_fault_fails_the_shard(tmp_path):
    from gpu_inputs import write_render_shard

    from pointvl.dataset.gpu_stage import GpuStage, run_items
    from pointvl.dataset.stages.refine import RefineConfig

    run = str(tmp_path)
    ids = write_render_shard(run, 0, n=4)

    class Edit(GpuStage):  # a GPU stage whose model is ``process``
        name, inputs, config_class = "refine", ("render",), RefineConfig
        schema = pa.schema([("instance_id", pa.string()), ("refined", pa.binary())])

        def __init__(self, process):
            super().__init__()
            self.process = process

        def process_shard(self, run, shard_index, drops):
            inputs = read_stage_table(run, "render", shard_index).select(["instance_id", "render"])
            return run_items(run, self.name, shard_index, inputs, self.process, self.schema, drops, batch_size=2)

    def process(rows: list[dict]) -> list[dict]:
        if any(r["instance_id"] == ids[1] for r in rows):
            raise ValueError("cannot identify image file")
        return [{"instance_id": r["instance_id"], "refined": r["render"]} for r in rows]

    stats = Edit(process).run_shard(run, 0)
    assert stats["dropped_refine_failed"] == 1 and list(stats["drops"]) == [ids[1]]
    assert read_stage_table(run, "refine", 0).column("instance_id").to_pylist() == [ids[0], *ids[2:]]

    def lost(rows: list[dict]) -> list[dict]:
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    (tmp_path / "stages" / "refine" / "shard-00000.parquet").unlink()
    with pytest.raises(RuntimeError, match="CUDA error"):
        Edit(lost).run_shard(run, 0)


def test_odd_names_cost_only_themselves_and_instance_ids_are_unique_by_construction(shapenet, tmp_path):
    """Synset ``chairs`` + model ``old-1`` and synset ``chairs-old`` + model ``1`` were both ``chairs-old-1-0``;
    a 10 MB category name made every later ``summarize`` fail; a folder name of other bytes than UTF-8."""
    from pointvl.dataset.plan import instance_id

    root = tmp_path / "shapenet"
    chair, table = "03001627", "04379243"
    sources = [Path(shapenet.root) / chair / m for m in shapenet.good[chair]]
    for (synset, model), source in zip([("chairs", "old-1"), ("chairs-old", "1"), ("chairs", "a"),
                                        ("chairs-old", "b")], sources, strict=True):
        shutil.copytree(source, root / synset / model)
    spare = Path(shapenet.root) / table / shapenet.good[table][0]
    shutil.copytree(spare, root / "huge" / "c")
    shutil.copytree(spare, root / "chairs" / ("m" * 201))
    shutil.copytree(spare, root / "chairs" / os.fsdecode(b"\xff-latin1"))  # a folder name of other bytes
    (root / "taxonomy.json").write_text(json.dumps([{"synsetId": "chairs", "name": "chair"},
                                                    {"synsetId": "chairs-old", "name": "old chair"},
                                                    {"synsetId": "huge", "name": "x" * 10_000_000}]))
    assert instance_id("chairs", "old-1", 0) != instance_id("chairs-old", "1", 0) == "chairs%2Dold-1-0"
    assert instance_id(chair, "1a2b", 3) == f"{chair}-1a2b-3"  # ShapeNet's ids are unchanged
    run = tmp_path / "run"
    config = {**CONFIG, "clean": {"test_size": 0.5, "train_size": None}}
    summary = build_in_process(str(root), str(run), BuildConfig.from_dict(config))
    ids = [r["instance_id"] for f in sorted((run / "shards").glob("*.parquet"))
           for r in pq.read_table(f, columns=["instance_id"]).to_pylist()]
    views = BuildConfig.from_dict(config).render.views_per_model
    assert summary["records"] == len(ids) == len(set(ids)) == 4 * views
    assert {"chairs-old-1-0", "chairs%2Dold-1-0"} <= set(ids)
    assert summary["dropped"]["clean:name_too_long"] == 2 and summary["dropped"]["clean:name_not_utf8"] == 1
    assert summarize(str(run))["records"] == summary["records"]  # again: summarize reads what clean wrote
    assert (run / "reports" / "cleaning.csv").stat().st_size < 10_000


def test_deep_nesting_and_huge_files_give_one_line_naming_the_file(catalogue, built, tmp_path):
    from pointvl.core import io
    from pointvl.core.errors import InputError
    from pointvl.dataset.plan import DamagedPlanError
    from pointvl.dataset.shapenet import read_taxonomy
    from pointvl.dataset.stages.base import finished

    shapenet = tmp_path / "shapenet"
    shapenet.mkdir()
    (shapenet / "taxonomy.json").write_text("[" * 2000 + "]" * 2000)  # 4 KB: RecursionError in json
    with pytest.raises(InputError, match=r"taxonomy .*taxonomy.json nests 2000 levels deep") as err:
        read_taxonomy(str(shapenet))
    assert "\n" not in str(err.value)
    run = tmp_path / "run"
    shutil.copytree(built[0], run)
    stats = run / "stages" / "render" / "shard-00000.stats.json"
    stats.write_text('{"a": ' + "[" * 2000 + "]" * 2000 + "}")
    assert not finished(str(run), "render", 0)  # damaged stats: the stage is redone, never a traceback
    (run / "plan.json").write_text("[" * 2000 + "]" * 2000)
    with pytest.raises(DamagedPlanError, match="plan.json is damaged .*nests 2000 levels deep"):
        load_plan(str(run))
    deep, bomb = tmp_path / "deep.yaml", tmp_path / "bomb.yaml"
    deep.write_text("a: " + "[" * 3000 + "]" * 3000)
    bomb.write_text("a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{c}: &{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n"
        for p, c in zip("abcdefgh", "bcdefghi", strict=True)))
    for path, why in ((deep, "nests too deep"), (bomb, "expands to more than")):
        with pytest.raises(InputError, match=why) as err:
            BuildConfig.from_file(str(path))
        assert str(path) in str(err.value) and "\n" not in str(err.value)
    big = tmp_path / "big.json"
    big.write_bytes(b'{"a": "' + b"x" * 2000 + b'"}')
    with pytest.raises(InputError, match="larger than 1,000 bytes"):
        io.read_json(str(big), max_bytes=1000)
