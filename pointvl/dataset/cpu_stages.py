"""The four CPU stages of one shard in one pass: each mesh is read once for all of them.

``sample_points`` and ``render`` read the mesh; ``geometry`` uses the fresh clouds and ``kpts2d``
the fresh masks, so a model's mesh is loaded once and its outputs never re-read from the run folder.
The tables written are the ones the stages write alone (``SamplePoints.run_shard`` etc.), stage by
stage, with the same finished test: a shard whose tables partly exist (a kill between two writes)
redoes only the missing stages. Stats also say which process built the shard (``worker``) and how
long reading its meshes took (``mesh_load_seconds``, shared by ``sample_points`` and ``render``).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

import trimesh

from pointvl.core.errors import ITEM_ERRORS
from pointvl.dataset.dag import CPU_STAGES
from pointvl.dataset.executor import worker_id
from pointvl.dataset.mesh import MeshError
from pointvl.dataset.plan import ModelEntry, Shard, load_plan
from pointvl.dataset.stages.base import Drops, ShardOutput, finished, read_stats
from pointvl.dataset.stages.clean import load_model_file
from pointvl.dataset.stages.geometry import Geometry, GeometryConfig
from pointvl.dataset.stages.kpts2d import Kpts2D, Kpts2DConfig
from pointvl.dataset.stages.render import Render, RenderConfig
from pointvl.dataset.stages.sample_points import SamplePoints, SamplePointsConfig

STAGE_NAMES = tuple(stage.name for stage in CPU_STAGES)


@dataclass
class CpuStagesConfig:
    """The configs of the four CPU stages (sections of :class:`pointvl.dataset.config.BuildConfig`)."""

    sample_points: SamplePointsConfig
    geometry: GeometryConfig
    render: RenderConfig
    kpts2d: Kpts2DConfig


def run_cpu_shard(shard_index: int, run_dir: str, config: CpuStagesConfig) -> dict[str, dict]:
    """Run the CPU stages not finished yet for work shard ``shard_index``; returns each stage's stats
    (``skipped`` when finished before)."""
    shard = load_plan(run_dir).shards[shard_index]
    todo = [s for s in STAGE_NAMES if not finished(run_dir, s, shard.index)]
    stats = {s: read_stats(run_dir, s, shard.index) | {"skipped": True} for s in STAGE_NAMES if s not in todo}
    if not todo:
        return stats
    sampler, renderer = SamplePoints(config.sample_points), Render(config.render)
    rows: dict[str, list[dict]] = {s: [] for s in ("sample_points", "render") if s in todo}
    drops = {s: Drops(s) for s in STAGE_NAMES}
    seconds: Counter[str] = Counter()
    mark = time.perf_counter()
    for model, mesh in _meshes(shard, [drops[s] for s in rows]) if rows else ():
        loaded = time.perf_counter()
        seconds["mesh_load"] += loaded - mark
        if "sample_points" in rows:
            rows["sample_points"].extend(sampler.model_rows(model, mesh, shard.views_per_model, drops["sample_points"]))
        sampled = time.perf_counter()
        if "render" in rows:
            rows["render"].extend(renderer.model_rows(model, mesh, drops["render"]))
        mark = time.perf_counter()
        seconds["sample_points"] += sampled - loaded
        seconds["render"] += mark - sampled
    seconds["mesh_load"] += time.perf_counter() - mark  # the failed loads after the last model
    for stage in rows:
        drops[stage].check(len(shard.models))

    def output(stage: str, made: list[dict], extra: dict | None = None) -> ShardOutput:
        mesh = {"mesh_load_seconds": round(seconds["mesh_load"], 3)} if stage in rows else {}
        return ShardOutput(made, {**mesh, **(extra or {}), "worker": worker_id()})

    if "sample_points" in todo:
        stats["sample_points"] = sampler.write(run_dir, shard.index, output("sample_points", rows["sample_points"]),
                                               drops["sample_points"], seconds["sample_points"])
    # geometry and kpts2d use the clouds and masks just made; alone (their input table was finished
    # earlier) they read them from the run folder, as when run on their own
    if "geometry" in todo and "sample_points" not in rows:
        stats["geometry"] = Geometry(config.geometry).run_shard(run_dir, shard.index)
    elif "geometry" in todo:
        mark, geometry = time.perf_counter(), Geometry(config.geometry)
        geo_rows = geometry.rows([r["instance_id"] for r in rows["sample_points"]],
                                 [r["points"] for r in rows["sample_points"]], drops["geometry"])
        stats["geometry"] = geometry.write(run_dir, shard.index, output("geometry", geo_rows), drops["geometry"],
                                           time.perf_counter() - mark)
    if "render" in todo:
        stats["render"] = renderer.write(run_dir, shard.index,
                                         output("render", rows["render"], {"backend": renderer.renderer.name}),
                                         drops["render"], seconds["render"])
    if "kpts2d" in todo and "render" not in rows:
        stats["kpts2d"] = Kpts2D(config.kpts2d).run_shard(run_dir, shard.index)
    elif "kpts2d" in todo:
        mark, kpts = time.perf_counter(), Kpts2D(config.kpts2d)
        kpts_rows = kpts.rows(rows["render"], drops["kpts2d"])
        stats["kpts2d"] = kpts.write(run_dir, shard.index, output("kpts2d", kpts_rows), drops["kpts2d"],
                                     time.perf_counter() - mark)
    return stats


def _meshes(shard: Shard, drops: list[Drops]) -> Iterator[tuple[ModelEntry, trimesh.Trimesh]]:
    """Each model of the shard with its mesh, read once; a model whose mesh cannot be loaded is dropped
    from every stage in ``drops``, with the reason each gives when it loads the mesh on its own."""
    for model in shard.models:
        item = f"{model.synset_id}/{model.model_id}"
        try:
            mesh = load_model_file(model.obj_path)
        except MeshError as err:
            for d in drops:
                d.add(item, err.reason, str(err))
            continue
        except ITEM_ERRORS as err:
            for d in drops:
                d.add(item, f"{d.stage}_failed", f"{type(err).__name__}: {err}")
            continue
        yield model, mesh
