from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.logging import get_run_logger

from pointvl.dataset.build_config import BuildConfig
from pointvl.dataset.cpu_stages import run_cpu_shard
from pointvl.dataset.executor import Executor


@task(name="cpu_stages", cache_policy=NO_CACHE, retries=1, task_run_name="cpu_stages-{shard_index:05d}")
def cpu_stages(run_dir: str, shard_index: int, config: BuildConfig, executor: Executor) -> dict:
    """sample_points, geometry, render and kpts2d of one shard on one of the executor's workers
    (finished stages are skipped there); returns each stage's stats."""
    stats = executor.submit(run_cpu_shard, shard_index, run_dir, config).result()
    get_run_logger().info("cpu stages shard-%05d: %s", shard_index,
                          {s: {k: v for k, v in st.items() if k != "drops"} for s, st in stats.items()})
    return stats
