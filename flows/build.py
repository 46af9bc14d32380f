"""The benchmark build, read as the DAG (``docs/design.md#the-dag``):

    clean ─► sample_points ─► geometry ────────────┐
       └───► render ─► kpts2d ─────────────────────┼─► refine (GPU) ─► synthesize (GPU) ─► annotate ─► review ─►
                                                                          write_shards ─► [train deployment]

Every task takes a run folder and a shard index; data moves by path. Finished shards are skipped,
so re-running the same build after a failure only does what is left. Before any stage, the build
checks that its training hand-off could start and takes the run folder's lock (one build per
folder; a second one ends CANCELLED naming the holder). ``review`` suspends for a person in deployed
builds (``tasks/review_gate.py``), keeping the lock; each stage publishes a ``progress-<stage>-…`` artifact,
and refine, synthesize, annotate and write_shards a ``stats-<stage>-…`` table of their shards' stats (keys:
:func:`pointvl.tasks.artifacts.artifact_key`).
The stages run in the order :data:`pointvl.dataset.dag.GROUPS` declares.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any

from prefect import flow
from prefect.context import get_run_context
from prefect.exceptions import Pause
from prefect.logging import get_run_logger
from prefect.states import Cancelled, Completed, Failed, State

from pointvl.core.errors import InputError
from pointvl.core.fence import LockLost
from pointvl.core.interrupt import reassert as reassert_interrupt_handlers
from pointvl.dataset.build_config import BuildConfig
from pointvl.dataset.dag import CPU_STAGES, GPU_STAGES, GROUPS, stage_config
from pointvl.dataset.diffusion_pipelines import check_backends
from pointvl.dataset.executor import open_executor
from pointvl.dataset.handoff import build_id
from pointvl.dataset.plan import load_plan
from pointvl.dataset.runlock import RunFolderLocked
from pointvl.dataset.stages.base import Stage
from pointvl.dataset.stages.review import Review
from pointvl.dataset.stages.write_shards import WriteShards
from pointvl.dataset.summary import summarize
from pointvl.dataset.tables import finished, read_stats
from pointvl.flows.gpu_stages import run_gpu_stage
from pointvl.tasks.artifacts import publish_finished, publish_stats, publish_summary, wait_with_progress
from pointvl.tasks.build_lock import build_lock, mark_crashed, record_build
from pointvl.tasks.review_gate import reentering_review, review_gate
from pointvl.tasks.run_logs import send_library_logs
from pointvl.tasks.stage_tasks import annotate, clean, cpu_stages, write_shards

SHARD_TASKS = {"annotate": annotate, "write_shards": write_shards}
"""The task of each stage after the GPU group that runs shard by shard here (review is the gate)."""


def planned_shards(out: str) -> list[int]:
    """The shards of the run folder's plan that have models (what ``clean`` returned when it made it)."""
    return [s.index for s in load_plan(out).shards if s.models]


def unfinished(out: str, stages: tuple[type[Stage], ...], shards: list[int]) -> list[int]:
    """The shards where any of ``stages`` has no verified final table (finished = the final file checks out)."""
    return [i for i in shards if not all(finished(out, stage.name, i) for stage in stages)]


@contextmanager
def holding(run_dir: str):
    """Hold the run folder's lock for the build; a suspended review keeps it (its flow run goes on)."""
    lock = build_lock(run_dir).acquire()
    if lock.taken_over is not None:
        mark_crashed(lock.taken_over)
    record_build(run_dir, lock)
    try:
        yield lock
    except Pause:
        lock.keep()
        raise
    except BaseException:
        lock.release()
        raise
    lock.release()


@flow(name="build-benchmark", description="ShapeNetCore v2 → Generative-Refined 3D-VL benchmark shards")
def build_benchmark(shapenet: str, out: str, config: dict | None = None, incremental: bool = False,
                    overrides: dict[str, Any] | None = None, handoff: dict[str, Any] | None = None,
                    workers: int | None = None, dask_scheduler: str | None = None) -> State:
    """Build (or resume) the benchmark from the ShapeNetCore v2 folder ``shapenet`` into ``out``.

    ``incremental`` (on in the scheduled deployment, which reuses one run folder): new or changed
    models and a changed config are built into ``out`` instead of being refused; only the shards and
    stages they affect are recomputed, and what they replace moves to ``out/superseded/``.
    ``overrides`` changes single config values (``{"review.preview_port": 9000}``) and ``handoff``
    the training hand-off's keys (``{"preset": "tiny"}``), without restating ``config``.
    ``workers`` (default: this machine's cores) or ``dask_scheduler`` (``tcp://HOST:PORT`` of a running
    Dask cluster): where clean's mesh validation and the CPU stages run (:mod:`pointvl.dataset.executor`).
    """
    reassert_interrupt_handlers()  # `pointvl build`: Ctrl-C and SIGTERM end the build in seconds
    send_library_logs()
    cfg = BuildConfig.from_parameters(config, overrides, handoff)
    reentering = reentering_review(out)
    try:
        # A run re-entering after a review answer checked both when it started (and its GPU stages are done):
        # skipping them here saves seconds of every answer (they import torch)
        if cfg.handoff.train and not reentering:
            from pointvl.train.train_config import check_handoff  # imports torch: only for a build that hands off

            check_handoff(cfg.handoff)  # seconds, before any stage, GPU second or API call
        if not reentering:
            # GPU stages run here (not on a deployment): their weights are checked now, not after the CPU stages
            check_backends({s.name: getattr(cfg, s.name) for s in GPU_STAGES if s.name not in cfg.gpu_deployments})
    except InputError as err:
        # A refusal, not a fault: the run fails with the one line as its state message, shown once in its log
        # ("Finished in state Failed(...)"), no traceback; raising would log it twice with tracebacks. The
        # error is the state's data, so a local caller (`pointvl build`) gets the InputError back.
        return Failed(message=str(err), data=err)
    try:
        with holding(out):
            summary, message = _build(shapenet, out, cfg, incremental, workers, dask_scheduler)
    except (RunFolderLocked, LockLost) as err:  # another build holds the folder: refused, or fenced out
        get_run_logger().error("%s", err)
        return Cancelled(message=str(err))
    return Completed(message=message, data=summary)


def _build(shapenet: str, out: str, cfg: BuildConfig, incremental: bool, workers: int | None,
           dask_scheduler: str | None) -> tuple[dict, str]:
    # A run re-entering after a review answer made its plan and stages itself: no re-cleaning, and only
    # stages whose final verified file is missing run (seconds from the answer to the next page).
    shards = planned_shards(out) if reentering_review(out) else None
    cpu_todo = None if shards is None else unfinished(out, CPU_STAGES, shards)
    if shards is None or cpu_todo:
        with open_executor(workers, dask_scheduler, shapenet, out) as executor:
            if shards is None:
                shards = clean(shapenet, out, cfg, incremental, executor)
                cpu_todo = shards  # each shard's finished stages are skipped on the worker
            bid = build_id(out)
            # the CPU group (sample_points ─► geometry, render ─► kpts2d), each mesh read once for all four
            cpu = [cpu_stages.submit(out, i, cfg, executor) for i in cpu_todo]
            wait_with_progress("cpu_stages", cpu, out, bid)  # a failed CPU stage stops the build before any GPU time
    bid = build_id(out)

    for stage in GROUPS["gpu"]:  # in-process, or on the GPU pool's deployment
        run_gpu_stage(stage.name, out, shards, cfg.gpu_deployments.get(stage.name), stage_config(cfg, stage.name),
                      workers=cfg.gpu_workers)
        publish_finished(out, stage.name, shards, bid)

    for stage in GROUPS["after"]:
        if stage is Review:  # the flow's human step: contact sheets, then a person's answer (tasks/review_gate.py)
            review_gate(out, shards, cfg.review, bid)
            continue
        # write_shards judges "up to date" itself (a newer review table rewrites a final shard); annotate's
        # finished shards are not even submitted
        todo = shards if stage is WriteShards else unfinished(out, (stage,), shards)
        futures = [SHARD_TASKS[stage.name].submit(out, i, stage_config(cfg, stage.name)) for i in todo]
        done = dict(zip(todo, wait_with_progress(stage.name, futures, out, bid), strict=True))
        stats = {i: done[i] if i in done else read_stats(out, stage.name, i) for i in shards}
        publish_stats(stage.name, stats, out, bid)
    summary = summarize(out)
    publish_summary(out, summary, bid)
    message = f"build {bid}: {summary['records']} records"
    if cfg.handoff.train:
        from pointvl.tasks.training import start_training  # imports torch: a re-entry after review starts faster

        training = start_training(out, cfg.handoff, str(get_run_context().flow_run.id))
        message += f"; training run {training}"
    return summary, message
