from prefect import task
from prefect.cache_policies import NO_CACHE

from pointvl.dataset.stages.refine import Refine, RefineConfig
from tasks.common import retry_unless_lock_lost, run_stage


@task(name="refine", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=30,
      retry_condition_fn=retry_unless_lock_lost, task_run_name="refine-{shard_index:05d}")
def refine(run_dir: str, shard_index: int, config: RefineConfig) -> dict:
    """Qwen-Image-Edit refinement of one shard's renders; a retry resumes at the first unfinished item."""
    return run_stage(Refine(config), run_dir, shard_index)
