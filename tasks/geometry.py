from prefect import task
from prefect.cache_policies import NO_CACHE

from pointvl.stages.geometry import Geometry, GeometryConfig
from tasks.common import run_shard_stage


@task(name="geometry", cache_policy=NO_CACHE, retries=1, task_run_name="geometry-{shard_index:05d}")
def geometry(run_dir: str, shard_index: int, config: GeometryConfig) -> dict:
    """AABBs and FPS keypoints for one shard (skipped when its table exists)."""
    return run_shard_stage("geometry", Geometry(config).run_shard, run_dir, shard_index)
