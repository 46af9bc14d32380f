from prefect import task
from prefect.cache_policies import NO_CACHE

from pointvl.stages.render import Render, RenderConfig
from tasks.common import run_shard_stage


@task(name="render", cache_policy=NO_CACHE, retries=1, task_run_name="render-{shard_index:05d}")
def render(run_dir: str, shard_index: int, config: RenderConfig) -> dict:
    """RGB, depth, mask and normal renders with cameras for one shard (skipped when finished)."""
    return run_shard_stage("render", Render(config).run_shard, run_dir, shard_index)
