"""The build's DAG, declared once: its stages, each naming the stages whose tables it reads.

    clean ─► sample_points ─► geometry ───────────┐
       └───► render ─► kpts2d ────────────────────┼─► refine (GPU) ─► synthesize (GPU) ─► annotate ─► review ─►
                                                                                               write_shards

``clean`` makes the plan (:func:`pointvl.dataset.runner.plan_run`); every other stage is a
:class:`pointvl.dataset.stages.base.Stage` over one work shard. The flow (``flows/build.py``), the plain
runner (:mod:`pointvl.dataset.runner`), the incremental keys (:mod:`pointvl.dataset.incremental`) and the summary read
this module; a stage's ``inputs`` are its edges.
"""

from __future__ import annotations

from pointvl.dataset.build_config import BuildConfig
from pointvl.dataset.stages.annotate import Annotate
from pointvl.dataset.stages.base import Stage
from pointvl.dataset.stages.geometry import Geometry
from pointvl.dataset.stages.kpts2d import Kpts2D
from pointvl.dataset.stages.refine import Refine
from pointvl.dataset.stages.render import Render
from pointvl.dataset.stages.review import Review
from pointvl.dataset.stages.sample_points import SamplePoints
from pointvl.dataset.stages.synthesize import Synthesize
from pointvl.dataset.stages.write_shards import WriteShards, WriteShardsConfig

CPU_STAGES: tuple[type[Stage], ...] = (SamplePoints, Geometry, Render, Kpts2D)
"""Read the mesh or what was made from it; run together per model on the CPU workers
(:mod:`pointvl.dataset.cpu_stages`)."""
GPU_STAGES: tuple[type[Stage], ...] = (Refine, Synthesize)
"""A diffusion model per item; in-process or on a GPU work pool (``flows/gpu_stages.py``)."""
STAGES: tuple[type[Stage], ...] = (*CPU_STAGES, *GPU_STAGES, Annotate, Review, WriteShards)
"""Every stage, in an order where a stage's inputs come before it."""
BY_NAME: dict[str, type[Stage]] = {s.name: s for s in STAGES}
TABLE_STAGES = tuple(s.name for s in STAGES if s is not WriteShards)
"""The stages with a table per work shard (``RUN/stages/<stage>/``); write_shards' output is the final shard."""


def inputs(stage: str) -> tuple[str, ...]:
    return BY_NAME[stage].inputs


def make_stage(stage: str, config: BuildConfig, categories: list[str]) -> Stage:
    """Stage ``stage`` with its section of ``config``; ``categories``: the benchmark's (annotate's choices)."""
    if stage == Annotate.name:
        return Annotate(config.annotate, categories)
    if stage == WriteShards.name:
        return WriteShards(WriteShardsConfig(config.geometry.num_keypoints))
    return BY_NAME[stage](getattr(config, stage))


def _check() -> None:
    seen: set[str] = set()
    for stage in STAGES:
        missing = set(stage.inputs) - seen
        if missing:
            raise AssertionError(f"{stage.name} reads {sorted(missing)}, which come later in the DAG")
        seen.add(stage.name)


_check()
