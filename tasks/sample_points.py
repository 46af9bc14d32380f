from prefect import task
from prefect.cache_policies import NO_CACHE

from pointvl.stages.sample_points import SamplePoints, SamplePointsConfig
from tasks.common import run_shard_stage


@task(name="sample_points", cache_policy=NO_CACHE, retries=1, task_run_name="sample_points-{shard_index:05d}")
def sample_points(run_dir: str, shard_index: int, config: SamplePointsConfig) -> dict:
    """Poisson-disk point clouds for one shard (skipped when its table exists)."""
    return run_shard_stage("sample_points", SamplePoints(config).run_shard, run_dir, shard_index)
