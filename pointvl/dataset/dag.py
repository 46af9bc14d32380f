"""The build's DAG, declared once: its stages, each naming the stages whose tables it reads.

    clean ─► sample_points ─► geometry ───────────┐
       └───► render ─► kpts2d ────────────────────┼─► refine (GPU) ─► synthesize (GPU) ─► annotate ─► review ─►
                                                                                               write_shards

``clean`` is the planning step before the DAG (:mod:`pointvl.dataset.clean`, :func:`pointvl.dataset.runner.plan_run`);
every other stage is a :class:`pointvl.dataset.stages.base.Stage` over one work shard, built from its section
of the config by :func:`make_stage`. :data:`GROUPS` is the order they run in: the flow (``flows/build.py``)
and the plain runner (:mod:`pointvl.dataset.runner`) iterate it, and no stage order is written anywhere else;
the incremental keys (:mod:`pointvl.dataset.incremental`) and the summary read it too. A stage's ``inputs``
are its edges.
"""

from __future__ import annotations

from typing import Any

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
from pointvl.dataset.stages.write_shards import WriteShards

CPU_STAGES: tuple[type[Stage], ...] = (SamplePoints, Geometry, Render, Kpts2D)
"""Read the mesh or what was made from it; run together per shard on the CPU workers, each mesh read once
(:mod:`pointvl.dataset.cpu_stages`)."""
GPU_STAGES: tuple[type[Stage], ...] = (Refine, Synthesize)
"""A diffusion model per item; in-process or on a GPU work pool (``flows/gpu_stages.py``)."""
AFTER_STAGES: tuple[type[Stage], ...] = (Annotate, Review, WriteShards)
"""Shard by shard once the images are final: annotation (an API), the review gate (a person, in a deployed
build), the final shards."""
GROUPS: dict[str, tuple[type[Stage], ...]] = {"cpu": CPU_STAGES, "gpu": GPU_STAGES, "after": AFTER_STAGES}
"""The DAG in the order it runs, group by group; the flow and the plain runner iterate it."""
STAGES: tuple[type[Stage], ...] = tuple(stage for group in GROUPS.values() for stage in group)
"""Every stage, in an order where a stage's inputs come before it."""
BY_NAME: dict[str, type[Stage]] = {s.name: s for s in STAGES}
TABLE_STAGES = tuple(s.name for s in STAGES if s is not WriteShards)
"""The stages with a table per work shard (``RUN/stages/<stage>/``); write_shards' output is the final shard."""


def inputs(stage: str) -> tuple[str, ...]:
    return BY_NAME[stage].inputs


def stage_config(config: BuildConfig, stage: str) -> Any:
    """Stage ``stage``'s section of ``config``: ``config.<stage>`` (every section is named after its stage)."""
    return getattr(config, stage)


def make_stage(stage: str, config: BuildConfig) -> Stage:
    """Stage ``stage`` with its section of ``config``."""
    return BY_NAME[stage](stage_config(config, stage))


def _check() -> None:
    seen: set[str] = set()
    for stage in STAGES:
        missing = set(stage.inputs) - seen
        if missing:
            raise AssertionError(f"{stage.name} reads {sorted(missing)}, which come later in the DAG")
        seen.add(stage.name)


_check()
