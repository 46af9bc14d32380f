from prefect import task
from prefect.cache_policies import NO_CACHE

from pointvl.dataset.stages.synthesize import Synthesize, SynthesizeConfig
from tasks.common import retry_unless_lock_lost, run_stage


@task(
    name="synthesize", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=30,
    retry_condition_fn=retry_unless_lock_lost,
    task_run_name="synthesize-{shard_index:05d}",
)
def synthesize(run_dir: str, shard_index: int, config: SynthesizeConfig) -> dict:
    """FLUX + ControlNet-Union-Pro synthesis of one shard, with drift scores; a retry resumes per item."""
    return run_stage(Synthesize(config), run_dir, shard_index)
