"""The build without an orchestrator: the same stages, in order, in this process.

``flows/build.py`` runs these steps as Prefect tasks; this plain loop is what the orchestration
overhead is measured against, and a way to build with no Prefect at all.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from pointvl.core import io
from pointvl.core.progress import Progress
from pointvl.dataset.config import BuildConfig
from pointvl.dataset.cpu_stages import CpuStagesConfig, run_cpu_shard
from pointvl.dataset.dag import CPU_STAGES, STAGES, make_stage
from pointvl.dataset.executor import Executor, open_executor
from pointvl.dataset.incremental import invalidate_stale
from pointvl.dataset.plan import (
    Plan,
    existing_plan,
    extend_plan,
    fingerprint,
    load_plan,
    make_plan,
    save_or_check_plan,
)
from pointvl.dataset.run_folder import RunFolder
from pointvl.dataset.stages.clean import Clean
from pointvl.dataset.summary import dataset_card, summarize

logger = logging.getLogger(__name__)


def remove_temp_files(run_dir: str, min_age_s: float = 60.0) -> int:
    """Remove the temporary files (``.tmp-*``) a killed run left; returns how many.

    Writers rename their temporary file into place (:mod:`pointvl.core.io`), so one left behind is a cut
    write that nothing reads. Called before a build plans (one build at a time per run folder); files
    younger than ``min_age_s`` are left, in case another writer (a preview server) is mid-write.
    """
    fs, root = io.filesystem(run_dir)
    if not fs.exists(root):
        return 0
    now = time.time()
    leftovers = [p for p in fs.find(root) if p.rsplit("/", 1)[-1].startswith(".tmp-")
                 and now - fs.modified(p).timestamp() >= min_age_s]
    for path in leftovers:
        fs.rm_file(path)
    if leftovers:
        logger.info("removed %d temporary files left by an interrupted run", len(leftovers))
    return len(leftovers)


def plan_run(
    shapenet: str,
    run_dir: str,
    config: BuildConfig,
    incremental: bool = False,
    executor: Executor | None = None,
    progress: Callable[[Progress], None] | None = None,
) -> Plan:
    """The run's shard plan: the existing one when the run folder has it, else clean and plan.

    A run folder keeps the plan it started with (same input, same config), so a resumed build
    processes exactly the shards it started with; another input or config is refused. An
    incremental build cleans again (models may have been added, changed or dropped), extends the
    plan and moves aside every output made for another config or model list
    (:mod:`pointvl.dataset.incremental`), so the stages then redo exactly those. Meshes are validated on
    ``executor``'s workers (default: in this process); ``progress`` follows the validation.
    """
    folder = RunFolder.of(run_dir)
    key = fingerprint(shapenet, config.output_dict())
    remove_temp_files(run_dir)
    if not incremental and (existing := existing_plan(run_dir, key)) is not None:
        logger.info("plan exists: cleaning skipped")
        return existing
    models = Clean(config.clean).run(shapenet, folder.cleaning_report, executor, folder.cache("clean"),
                                     progress)
    io.write_json(folder.config, {"shapenet": shapenet, **config.to_dict()})
    views = config.render.views_per_model
    if not incremental:
        return save_or_check_plan(run_dir, make_plan(models, config.shard_size, views, key))
    old = load_plan(run_dir) if io.exists(folder.plan) else Plan(())
    plan = extend_plan(old, models, config.shard_size, views, key)
    if plan != old:  # an unchanged run folder stays byte for byte (and mtime for mtime) as it was
        io.write_json(folder.plan, plan.to_json())
    invalidate_stale(run_dir, plan, config)
    return plan


def cpu_config(config: BuildConfig) -> CpuStagesConfig:
    return CpuStagesConfig(config.sample_points, config.geometry, config.render, config.kpts2d)


def build_in_process(
    shapenet: str,
    run_dir: str,
    config: BuildConfig,
    incremental: bool = False,
    workers: int | None = None,
    dask_scheduler: str | None = None,
) -> dict:
    """Build (or resume) the benchmark without Prefect; returns the summary.

    ``incremental``: reuse a run folder of another config or input (see :func:`plan_run`).
    ``workers`` / ``dask_scheduler``: where clean's validation and the CPU stages run
    (:func:`pointvl.dataset.executor.open_executor`); the GPU stages, annotation and the shards run here.
    """
    with open_executor(workers, dask_scheduler, shapenet, run_dir) as executor:
        plan = plan_run(shapenet, run_dir, config, incremental, executor)
        shards = [s for s in plan.shards if s.models]  # an emptied shard (incremental) has nothing to build
        tracker = Progress("cpu stages:", len(shards), "shards")
        for _ in executor.map(run_cpu_shard, [s.index for s in shards], run_dir, cpu_config(config)):
            tracker.advance()
    categories = sorted({m.category for s in plan.shards for m in s.models})
    # the CPU stages are done above, model by model; the rest in DAG order, shard by shard (review:
    # no one to ask here, so its policy decides)
    later = [make_stage(s.name, config, categories) for s in STAGES if s not in CPU_STAGES]
    for shard in shards:
        for stage in later:
            stage.run_shard(run_dir, shard.index)
    summary = summarize(run_dir)
    io.write_bytes(RunFolder.of(run_dir).dataset_card, dataset_card(summary).encode())
    return summary
