from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.logging import get_run_logger

from pointvl import io
from pointvl.plan import load_plan
from pointvl.stages.write_shards import WriteShards, WriteShardsConfig, shards_dir


@task(name="write_shards", cache_policy=NO_CACHE, task_run_name="write_shards-{shard_index:05d}")
def write_shards(run_dir: str, shard_index: int, config: WriteShardsConfig) -> dict:
    """Join one work shard's stage tables into its final Parquet file (skipped when it exists)."""
    shard = load_plan(run_dir).shards[shard_index]
    if io.exists(io.join(shards_dir(run_dir), shard.final_name)):
        get_run_logger().info("%s exists: skipped", shard.final_name)
        return {"skipped": True}
    return WriteShards(config).run_shard(run_dir, shard_index)
