"""Progress artifacts: one per stage and build, updated as its shards finish (keys ``progress-<stage>-<build id>``)."""

from __future__ import annotations

from typing import Any

from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.futures import PrefectFuture, as_completed

from pointvl.build.stages.base import finished


def _key(stage: str, build_id: str) -> str:
    return f"progress-{stage.replace('_', '-')}-{build_id}"


def wait_with_progress(stage: str, futures: list[PrefectFuture], build_id: str) -> list[Any]:
    """Wait for a stage's shard futures, updating its progress artifact; returns the results in order
    (raising the first failure's exception)."""
    total = len(futures)
    artifact = create_progress_artifact(0.0 if total else 100.0, key=_key(stage, build_id),
                                         description=f"{stage}: 0/{total}")
    for n, _ in enumerate(as_completed(futures), 1):
        update_progress_artifact(artifact, 100.0 * n / total, description=f"{stage}: {n}/{total} shards")
    return [f.result() for f in futures]


def publish_progress(run_dir: str, stage: str, shard_indices: list[int], build_id: str) -> float:
    """Publish the share of ``shard_indices`` whose ``stage`` table exists (for stages run elsewhere)."""
    done = sum(finished(run_dir, stage, i) for i in shard_indices)
    progress = 100.0 * done / len(shard_indices) if shard_indices else 100.0
    create_progress_artifact(progress, key=_key(stage, build_id),
                             description=f"{stage}: {done}/{len(shard_indices)} shards")
    return progress
