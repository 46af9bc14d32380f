from prefect import task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from pointvl.build.stages.synthesize import Synthesize, SynthesizeConfig
from tasks.common import run_stage


@task(
    name="synthesize", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=30,
    task_run_name="synthesize-{shard_index:05d}",
)
def synthesize(run_dir: str, shard_index: int, config: SynthesizeConfig) -> dict:
    """FLUX + ControlNet-Union-Pro synthesis of one shard, with drift scores; a retry resumes per item."""
    stats = run_stage(Synthesize(config), run_dir, shard_index)
    if not stats.get("skipped"):
        create_markdown_artifact(
            key=f"synthesize-shard-{shard_index:05d}",
            markdown=f"synthesize shard {shard_index:05d}: {stats['generated']} generated, "
            f"{stats['resumed']} resumed, **{stats['drift_flagged']} flagged for pose drift**, "
            f"backend `{stats['backend']}`, {stats['seconds']:.1f} s",
            description="synthesize stage stats",
        )
    return stats
