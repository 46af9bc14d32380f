from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.logging import get_run_logger

from pointvl.plan import load_plan
from pointvl.stages.write_shards import WriteShards, WriteShardsConfig


@task(name="write_shards", cache_policy=NO_CACHE, task_run_name="write_shards-{shard_index:05d}")
def write_shards(run_dir: str, shard_index: int, config: WriteShardsConfig) -> dict:
    """Join one work shard's stage tables into its final Parquet file (skipped when it is up to date)."""
    if WriteShards.up_to_date(run_dir, shard_index):
        get_run_logger().info("%s is up to date: skipped", load_plan(run_dir).shards[shard_index].final_name)
        return {"skipped": True}
    return WriteShards(config).run_shard(run_dir, shard_index)
