from prefect import task
from prefect.cache_policies import NO_CACHE

from pointvl.stages.kpts2d import Kpts2D, Kpts2DConfig
from tasks.common import run_shard_stage


@task(name="kpts2d", cache_policy=NO_CACHE, retries=1, task_run_name="kpts2d-{shard_index:05d}")
def kpts2d(run_dir: str, shard_index: int, config: Kpts2DConfig) -> dict:
    """Mask boxes and morphological 2D keypoints for one shard (skipped when finished)."""
    return run_shard_stage("kpts2d", Kpts2D(config).run_shard, run_dir, shard_index)
