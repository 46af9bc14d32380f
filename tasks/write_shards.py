from prefect import task
from prefect.cache_policies import NO_CACHE

from pointvl.dataset.stages.write_shards import WriteShards, WriteShardsConfig
from pointvl.tasks.common import run_stage


@task(name="write_shards", cache_policy=NO_CACHE, task_run_name="write_shards-{shard_index:05d}")
def write_shards(run_dir: str, shard_index: int, config: WriteShardsConfig) -> dict:
    """Join one work shard's stage tables into its final Parquet file (skipped when it is up to date)."""
    return run_stage(WriteShards(config), run_dir, shard_index)
