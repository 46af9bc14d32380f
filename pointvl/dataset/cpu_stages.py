"""The CPU group of one shard in one pass: each mesh is read once for all four stages.

``sample_points`` and ``render`` read the mesh (:class:`pointvl.dataset.stages.base.MeshStage`);
``geometry`` is made from the fresh clouds and ``kpts2d`` from the fresh masks
(:class:`pointvl.dataset.stages.base.RowStage`), so a model's mesh is loaded once, one model at a time,
and what was made from it is not read back from the run folder. Every stage runs through the contract's
runner (:meth:`pointvl.dataset.stages.base.Stage.open_shard`): the same finished test, drops, timing and
table as alone, so a shard whose tables partly exist (a kill between two writes) redoes only the missing
stages. Stats also say which process built the shard (``worker``) and how long reading its meshes took
(``mesh_load_seconds``, shared by ``sample_points`` and ``render``).
"""

from __future__ import annotations

import time

from pointvl.dataset.build_config import BuildConfig
from pointvl.dataset.dag import CPU_STAGES, make_stage
from pointvl.dataset.executor import worker_id
from pointvl.dataset.mesh import model_meshes
from pointvl.dataset.plan import Shard, load_plan
from pointvl.dataset.stages.base import MeshStage, RowStage, ShardJob, ShardOutput

STAGE_NAMES = tuple(stage.name for stage in CPU_STAGES)


def run_cpu_shard(shard_index: int, run_dir: str, config: BuildConfig) -> dict[str, dict]:
    """Run the CPU stages not finished yet for work shard ``shard_index``; returns each stage's stats
    (``skipped`` when finished before)."""
    shard = load_plan(run_dir).shards[shard_index]
    stages = [make_stage(stage.name, config) for stage in CPU_STAGES]
    worker = {"worker": worker_id()}
    stats: dict[str, dict] = {}
    # 1. the mesh stages: each mesh read once for those not finished
    jobs = [stage.open_shard(run_dir, shard.index) for stage in stages if isinstance(stage, MeshStage)]
    made, load_seconds = _read_meshes(shard, [job for job in jobs if job.done is None])
    for job in jobs:
        if job.done is None:
            out = job.stage.output(made[job.stage.name])
            job.write(ShardOutput(out.rows, {"mesh_load_seconds": round(load_seconds, 3), **out.stats, **worker}))
        stats[job.stage.name] = job.done
    # 2. the stages made from their rows: from the rows just made, else (finished before) from the table
    for stage in stages:
        if not isinstance(stage, RowStage):
            continue
        job = stage.open_shard(run_dir, shard.index)
        if job.done is None:
            (source,) = stage.inputs
            with job.timed():
                rows = (stage.rows(made[source], job.drops) if source in made
                        else stage.process_shard(job.run, shard.index, job.drops))
            job.write(ShardOutput(rows, worker))
        stats[stage.name] = job.done
    return stats


def _read_meshes(shard: Shard, jobs: list[ShardJob]) -> tuple[dict[str, list[dict]], float]:
    """The rows the mesh stage of each job makes of the shard, reading each mesh once for all of them, one
    model at a time, and the seconds spent reading; each stage's own time goes to its job. A model whose
    mesh cannot be loaded is dropped from every stage, with the reason each gives when it reads alone."""
    made: dict[str, list[dict]] = {job.stage.name: [] for job in jobs}
    if not jobs:
        return made, 0.0

    def dropped(item: str, err: Exception) -> None:
        for job in jobs:
            job.drops.add_error(item, err)

    load_seconds, mark = 0.0, time.perf_counter()
    for model, mesh in model_meshes(shard.models, dropped):
        load_seconds += time.perf_counter() - mark
        for job in jobs:
            with job.timed():
                made[job.stage.name].extend(job.stage.model_rows(model, mesh, shard.views_per_model, job.drops))
        mark = time.perf_counter()
    load_seconds += time.perf_counter() - mark  # the failed loads after the last model
    for job in jobs:
        job.drops.check(len(shard.models))
    return made, load_seconds
