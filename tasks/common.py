"""The wrapper every per-shard stage task shares: skip finished shards, log, return the stats."""

from __future__ import annotations

from collections.abc import Callable

from prefect.logging import get_run_logger

from pointvl.stages.base import finished, read_stats


def run_shard_stage(stage: str, run: Callable[[str, int], dict], run_dir: str, shard_index: int) -> dict:
    """Run ``run(run_dir, shard_index)`` unless the shard's table exists; return the shard's stats."""
    logger = get_run_logger()
    if finished(run_dir, stage, shard_index):
        logger.info("%s shard-%05d already finished: skipped", stage, shard_index)
        return read_stats(run_dir, stage, shard_index) | {"skipped": True}
    stats = run(run_dir, shard_index)
    logger.info("%s shard-%05d: %s", stage, shard_index, stats)
    return stats
