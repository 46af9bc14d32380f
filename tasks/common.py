"""What every per-shard stage task shares: run the stage (it skips a finished shard), log to the run."""

from __future__ import annotations

from prefect.logging import get_run_logger

from pointvl.dataset.stages.base import Stage


def run_stage(stage: Stage, run_dir: str, shard_index: int) -> dict:
    """``stage.run_shard(run_dir, shard_index)``, logged to the flow run; returns the shard's stats."""
    stats = stage.run_shard(run_dir, shard_index)
    shown = {k: v for k, v in stats.items() if k != "drops"}
    get_run_logger().info("%s shard-%05d: %s", stage.name, shard_index, "skipped (finished)" if stats.get("skipped")
                          else shown)
    return stats
