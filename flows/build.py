"""The benchmark build, read as the DAG (DESIGN.md):

    clean ─► sample_points ─► geometry ────────────┐
       └───► render ─► kpts2d ─────────────────────┼─► refine (GPU) ─► synthesize (GPU) ─► annotate ─► review ─►
                                                                          write_shards ─► [train deployment]

Every task takes a run folder and a shard index; data moves by path. Finished shards are skipped,
so re-running the same build after a failure only does what is left. Before any stage, the build
checks that its training hand-off could start and takes the run folder's lock (one build per
folder; a second one ends CANCELLED naming the holder). ``review`` suspends for a person in deployed
builds (``flows/review.py``), keeping the lock; each stage publishes a ``progress-<stage>`` artifact,
and refine, synthesize and annotate a ``stats-<stage>`` table of their shards' stats.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any

from prefect import flow
from prefect.context import get_run_context
from prefect.exceptions import Pause
from prefect.logging import get_run_logger
from prefect.states import Cancelled, Completed, State

from flows.gpu_stages import run_gpu_stage
from flows.locking import build_lock, mark_crashed, record_build
from flows.review import review_gate
from pointvl.cli.interrupt import reassert as reassert_interrupt_handlers
from pointvl.core.fence import LockLost
from pointvl.dataset.config import BuildConfig
from pointvl.dataset.dag import GPU_STAGES
from pointvl.dataset.executor import open_executor
from pointvl.dataset.handoff import build_id, check_can_start
from pointvl.dataset.runlock import RunFolderLocked
from pointvl.dataset.runner import cpu_config
from pointvl.dataset.stages.write_shards import WriteShardsConfig
from pointvl.dataset.summary import summarize
from tasks.annotate import annotate
from tasks.clean import clean
from tasks.cpu_stages import cpu_stages
from tasks.handoff import start_training
from tasks.progress import publish_finished, publish_stats, wait_with_progress
from tasks.summary import publish_summary
from tasks.write_shards import write_shards


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
    cfg = BuildConfig.from_parameters(config, overrides, handoff)
    if cfg.handoff.train:
        check_can_start(cfg.handoff)  # seconds, before any stage, GPU second or API call
    try:
        with holding(out):
            summary, message = _build(shapenet, out, cfg, incremental, workers, dask_scheduler)
    except (RunFolderLocked, LockLost) as err:  # another build holds the folder: refused, or fenced out
        get_run_logger().error("%s", err)
        return Cancelled(message=str(err))
    return Completed(message=message, data=summary)


def _build(shapenet: str, out: str, cfg: BuildConfig, incremental: bool, workers: int | None,
           dask_scheduler: str | None) -> tuple[dict, str]:
    with open_executor(workers, dask_scheduler, shapenet, out) as executor:
        shards = clean(shapenet, out, cfg, incremental, executor)
        bid = build_id(out)
        # sample_points ─► geometry and render ─► kpts2d, each mesh read once for all four
        cpu = [cpu_stages.submit(out, i, cpu_config(cfg), executor) for i in shards]
        wait_with_progress("cpu_stages", cpu, bid)  # a failed CPU stage stops the build here, before any GPU time

    for stage in GPU_STAGES:  # refine ─► synthesize: in-process, or on the GPU pool's deployment
        run_gpu_stage(stage.name, out, shards, cfg.gpu_deployments.get(stage.name), getattr(cfg, stage.name),
                      workers=cfg.gpu_workers)
        publish_finished(out, stage.name, shards, bid)

    annotated = wait_with_progress("annotate", [annotate.submit(out, i, cfg.annotate) for i in shards], bid)
    publish_stats("annotate", dict(zip(shards, annotated, strict=True)), bid)
    review_gate(out, shards, cfg.review, bid)
    finals = [write_shards.submit(out, i, WriteShardsConfig(cfg.geometry.num_keypoints)) for i in shards]
    wait_with_progress("write_shards", finals, bid)
    summary = summarize(out)
    publish_summary(out, summary, bid)
    message = f"build {bid}: {summary['records']} records"
    if cfg.handoff.train:
        training = start_training(out, cfg.handoff, str(get_run_context().flow_run.id))
        message += f"; training run {training}"
    return summary, message
