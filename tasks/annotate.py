"""Prefect task for stage `annotate`: one work shard, keys from the environment or Secret blocks."""

from __future__ import annotations

from prefect import Task, task
from prefect.cache_policies import NO_CACHE
from prefect.client.schemas.objects import TaskRun
from prefect.states import State
from pydantic import SecretStr

from pointvl.core.chat_client import FatalAPIError
from pointvl.core.fence import LockLost
from pointvl.dataset.plan import load_plan
from pointvl.dataset.stages.annotate import Annotate, AnnotateConfig
from tasks.common import run_stage


def _secret(block_name: str) -> SecretStr | None:
    """The value of Prefect Secret block ``block_name`` (``None`` when no block is named)."""
    if not block_name:
        return None
    from prefect.blocks.system import Secret

    return SecretStr(str(Secret.load(block_name).get()))


def _retry_unless_fatal(task: Task, task_run: TaskRun, state: State) -> bool:
    """Retry transient failures (a batch still running, a dropped connection); a rejected key or model,
    an invalid config or a run folder taken over by another build will not fix itself."""
    try:
        state.result()
    except (FatalAPIError, ValueError, FileNotFoundError, LockLost):
        return False
    except Exception:
        return True
    return True


@task(
    name="annotate",
    cache_policy=NO_CACHE,
    retries=3,
    retry_delay_seconds=[30, 300, 1800],
    retry_condition_fn=_retry_unless_fatal,
    task_run_name="annotate-{shard_index:05d}",
)
def annotate(run_dir: str, shard_index: int, config: AnnotateConfig) -> dict:
    """QA, descriptions and 2D grounding for one shard (skipped when finished; a retry pays for no reply
    twice: replies are cached under ``RUN/cache/annotate`` and a running batch is picked up again).

    Keys come from the Secret blocks named in ``config`` when set, else from the environment variables
    it names. Categories are those of the run's plan.
    """
    categories = sorted({m.category for s in load_plan(run_dir).shards for m in s.models})
    stage = Annotate(
        config,
        categories,
        api_key=_secret(config.api_key_secret_block),
        vlm_api_key=_secret(config.vlm_api_key_secret_block),
    )
    return run_stage(stage, run_dir, shard_index)
