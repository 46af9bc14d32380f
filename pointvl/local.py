"""The build without an orchestrator: the same stages, in order, in this process.

``flows/build.py`` runs these steps as Prefect tasks; this plain loop is what the orchestration
overhead is measured against, and a way to build with no Prefect at all.
"""

from __future__ import annotations

import logging

from pointvl import io
from pointvl.config import BuildConfig
from pointvl.plan import Plan, fingerprint, load_plan, make_plan, plan_path, save_or_check_plan
from pointvl.stages.annotate import Annotate
from pointvl.stages.base import finished
from pointvl.stages.clean import Clean
from pointvl.stages.geometry import Geometry
from pointvl.stages.kpts2d import Kpts2D
from pointvl.stages.refine import Refine
from pointvl.stages.render import Render
from pointvl.stages.review import apply_decisions, policy_decisions
from pointvl.stages.sample_points import SamplePoints
from pointvl.stages.synthesize import Synthesize
from pointvl.stages.write_shards import WriteShards, WriteShardsConfig, shards_dir
from pointvl.summary import dataset_card, summarize

logger = logging.getLogger(__name__)


def cleaning_report_path(run_dir: str) -> str:
    return io.join(run_dir, "reports", "cleaning.csv")


def plan_run(shapenet: str, run_dir: str, config: BuildConfig) -> Plan:
    """The run's shard plan: the existing one when the run folder has it, else clean and plan.

    A run folder keeps the plan it started with (same input, same config), so a resumed build
    processes exactly the shards it started with; another input or config is refused.
    """
    key = fingerprint(shapenet, config.output_dict())
    if io.exists(plan_path(run_dir)) and load_plan(run_dir).fingerprint == key:
        logger.info("plan exists: cleaning skipped")
        return load_plan(run_dir)
    models = Clean(config.clean).run(shapenet, cleaning_report_path(run_dir))
    io.write_json(io.join(run_dir, "config.json"), {"shapenet": shapenet, **config.to_dict()})
    return save_or_check_plan(run_dir, make_plan(models, config.shard_size, config.render.views_per_model, key))


def build_in_process(shapenet: str, run_dir: str, config: BuildConfig) -> dict:
    """Build (or resume) the benchmark in this process; returns the summary."""
    plan = plan_run(shapenet, run_dir, config)
    categories = sorted({m.category for s in plan.shards for m in s.models})
    stages = [
        ("sample_points", SamplePoints(config.sample_points).run_shard),
        ("geometry", Geometry(config.geometry).run_shard),
        ("render", Render(config.render).run_shard),
        ("kpts2d", Kpts2D(config.kpts2d).run_shard),
        ("refine", Refine(config.refine).run_shard),
        ("synthesize", Synthesize(config.synthesize).run_shard),
        ("annotate", Annotate(config.annotate, categories).run_shard),
    ]
    writer = WriteShards(WriteShardsConfig(config.geometry.num_keypoints))
    for shard in plan.shards:
        for name, run in stages:
            if not finished(run_dir, name, shard.index):
                run(run_dir, shard.index)
        if not finished(run_dir, "review", shard.index):  # no one to ask here: the review policy applies
            decisions = policy_decisions(run_dir, [shard.index], config.review.timeout_policy, "gate off")
            apply_decisions(run_dir, shard.index, decisions[shard.index])
        if not io.exists(io.join(shards_dir(run_dir), shard.final_name)):
            writer.run_shard(run_dir, shard.index)
    summary = summarize(run_dir)
    io.write_bytes(io.join(shards_dir(run_dir), "README.md"), dataset_card(summary).encode())
    return summary
