"""Annotation of one shard as its own flow, for the ``annotate`` deployment on the CPU work pool.

The build annotates in-process; this entry re-runs or back-fills one shard's annotation on a CPU
worker that holds the API keys (Secret blocks or environment), e.g. after a failed batch. A shard
whose annotate table exists is skipped.
"""

from __future__ import annotations

from prefect import flow

from pointvl.core.strict_config import load
from pointvl.dataset.annotation_config import AnnotateConfig
from pointvl.tasks.run_logs import send_library_logs
from pointvl.tasks.stage_tasks import annotate


@flow(name="annotate-shard", description="LLM/VLM QA, descriptions and 2D grounding of one shard (CPU, API)")
def annotate_shard(run_dir: str, shard_index: int, config: dict | None = None) -> dict:
    send_library_logs()
    return annotate(run_dir, shard_index, load(AnnotateConfig, config, "annotate"))
