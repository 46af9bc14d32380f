"""What every per-shard stage task shares: run the stage (it skips a finished shard), log to the run."""

from __future__ import annotations

from prefect import Task
from prefect.client.schemas.objects import TaskRun
from prefect.logging import get_run_logger
from prefect.states import State

from pointvl.core.errors import InputError
from pointvl.dataset.stages.base import Stage


def run_stage(stage: Stage, run_dir: str, shard_index: int) -> dict:
    """``stage.run_shard(run_dir, shard_index)``, logged to the flow run; returns the shard's stats."""
    stats = stage.run_shard(run_dir, shard_index)
    shown = {k: v for k, v in stats.items() if k != "drops"}
    get_run_logger().info("%s shard-%05d: %s", stage.name, shard_index, "skipped (finished)" if stats.get("skipped")
                          else shown)
    return stats


def retry_unless_input_error(task: Task, task_run: TaskRun, state: State) -> bool:
    """Retry faults of the run (a lost worker, a CUDA error); missing weights, a device too small for
    the offload asked for or a bad config (:class:`~pointvl.core.errors.InputError`) will not fix themselves."""
    try:
        state.result()
    except InputError:
        return False
    except Exception:
        return True
    return True
