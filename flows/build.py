"""The benchmark build, read as the DAG (DESIGN.md):

    clean ─► sample_points ─► geometry ────────────┐
       └───► render ─► kpts2d ─────────────────────┼─► refine (GPU) ─► synthesize (GPU) ─► annotate ─► review ─►
                                                                          write_shards ─► [train deployment]

Every task takes a run folder and a shard index; data moves by path. Finished shards are skipped,
so re-running the same build after a failure only does what is left. ``review`` pauses for a person
in deployed builds (``flows/review.py``); each stage publishes a ``progress-<stage>`` artifact.
"""

from __future__ import annotations

from prefect import flow

from flows.gpu_stages import run_gpu_stage
from flows.review import review_gate
from pointvl.config import BuildConfig
from pointvl.stages.write_shards import WriteShardsConfig
from pointvl.summary import summarize
from tasks.annotate import annotate
from tasks.clean import clean
from tasks.geometry import geometry
from tasks.handoff import start_training
from tasks.kpts2d import kpts2d
from tasks.progress import publish_progress, wait_with_progress
from tasks.render import render
from tasks.sample_points import sample_points
from tasks.summary import publish_summary
from tasks.write_shards import write_shards


@flow(name="build-benchmark", description="ShapeNetCore v2 → Generative-Refined 3D-VL benchmark shards")
def build_benchmark(shapenet: str, out: str, config: dict | None = None, incremental: bool = False) -> dict:
    """Build (or resume) the benchmark from the ShapeNetCore v2 folder ``shapenet`` into ``out``.

    ``incremental`` (on in the scheduled deployment, which reuses one run folder): new or changed
    models and a changed config are built into ``out`` instead of being refused; only the shards and
    stages they affect are recomputed, and what they replace moves to ``out/superseded/``.
    """
    cfg = BuildConfig.from_dict(config)
    shards = clean(shapenet, out, cfg, incremental)

    points = [sample_points.submit(out, i, cfg.sample_points) for i in shards]
    boxes = [geometry.submit(out, i, cfg.geometry, wait_for=[p]) for i, p in zip(shards, points, strict=True)]
    renders = [render.submit(out, i, cfg.render) for i in shards]
    masks = [kpts2d.submit(out, i, cfg.kpts2d, wait_for=[r]) for i, r in zip(shards, renders, strict=True)]
    for stage, futures in (("sample_points", points), ("geometry", boxes), ("render", renders), ("kpts2d", masks)):
        wait_with_progress(stage, futures)  # a failed CPU stage stops the build here, before any GPU time is spent

    run_gpu_stage("refine", out, shards, cfg.gpu_deployments.get("refine"), cfg.refine, workers=cfg.gpu_workers)
    publish_progress(out, "refine", shards)
    run_gpu_stage("synthesize", out, shards, cfg.gpu_deployments.get("synthesize"), cfg.synthesize,
                  workers=cfg.gpu_workers)
    publish_progress(out, "synthesize", shards)

    wait_with_progress("annotate", [annotate.submit(out, i, cfg.annotate) for i in shards])
    review_gate(out, shards, cfg.review)
    finals = [write_shards.submit(out, i, WriteShardsConfig(cfg.geometry.num_keypoints)) for i in shards]
    wait_with_progress("write_shards", finals)
    summary = summarize(out)
    publish_summary(out, summary)
    if cfg.handoff.train:
        start_training(out, cfg.handoff)
    return summary
