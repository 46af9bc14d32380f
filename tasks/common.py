"""What every per-shard stage task shares: run the stage (it skips a finished shard), log to the run."""

from __future__ import annotations

from prefect import Task
from prefect.client.schemas.objects import TaskRun
from prefect.logging import get_run_logger
from prefect.states import State

from pointvl.core.fence import LockLost
from pointvl.dataset.stages.base import Stage


def retry_unless_lock_lost(task: Task, task_run: TaskRun, state: State) -> bool:
    """Retry a failed shard, unless its build lost the run folder to another build (it writes nothing more)."""
    try:
        state.result()
    except LockLost:
        return False
    except Exception:
        return True
    return True


def run_stage(stage: Stage, run_dir: str, shard_index: int) -> dict:
    """``stage.run_shard(run_dir, shard_index)``, logged to the flow run; returns the shard's stats."""
    stats = stage.run_shard(run_dir, shard_index)
    shown = {k: v for k, v in stats.items() if k != "drops"}
    get_run_logger().info("%s shard-%05d: %s", stage.name, shard_index, "skipped (finished)" if stats.get("skipped")
                          else shown)
    return stats
