"""Progress and stats artifacts, one of each per stage and build (keys ``progress-<stage>-<build id>``,
``stats-<stage>-<build id>``).

Each artifact is an API call: progress is updated at most every :data:`UPDATE_EVERY_S` seconds (and
when the stage ends), and a stage's shard stats are one table, not an artifact per shard.
"""

from __future__ import annotations

import time
from typing import Any

from prefect.artifacts import create_progress_artifact, create_table_artifact, update_progress_artifact
from prefect.futures import PrefectFuture, as_completed

from pointvl.build.stages.base import finished, read_stats

UPDATE_EVERY_S = 2.0


def _key(kind: str, stage: str, build_id: str) -> str:
    return f"{kind}-{stage.replace('_', '-')}-{build_id}"


def wait_with_progress(stage: str, futures: list[PrefectFuture], build_id: str) -> list[Any]:
    """Wait for a stage's shard futures, updating its progress artifact; returns the results in order
    (raising the first failure's exception)."""
    total = len(futures)
    artifact = create_progress_artifact(0.0 if total else 100.0, key=_key("progress", stage, build_id),
                                        description=f"{stage}: 0/{total}")
    shown = time.monotonic()
    for n, _ in enumerate(as_completed(futures), 1):
        if n == total or time.monotonic() - shown >= UPDATE_EVERY_S:
            update_progress_artifact(artifact, 100.0 * n / total, description=f"{stage}: {n}/{total} shards")
            shown = time.monotonic()
    return [f.result() for f in futures]


def publish_progress(run_dir: str, stage: str, shard_indices: list[int], build_id: str) -> float:
    """Publish the share of ``shard_indices`` whose ``stage`` table exists (for stages run elsewhere)."""
    done = sum(finished(run_dir, stage, i) for i in shard_indices)
    progress = 100.0 * done / len(shard_indices) if shard_indices else 100.0
    create_progress_artifact(progress, key=_key("progress", stage, build_id),
                             description=f"{stage}: {done}/{len(shard_indices)} shards")
    return progress


def publish_stats(run_dir: str, stage: str, shard_indices: list[int], build_id: str) -> list[dict]:
    """A table of the finished shards' stats (the scalar ones: counts, seconds, backend), read from the run
    folder so that it holds shards built on a GPU pool's deployment too; returns its rows."""
    rows = [{"shard": i, **{k: v for k, v in read_stats(run_dir, stage, i).items()
                            if isinstance(v, int | float | str | bool)}}
            for i in shard_indices if finished(run_dir, stage, i)]
    create_table_artifact(rows, key=_key("stats", stage, build_id), description=f"{stage}: stats per shard")
    return rows
