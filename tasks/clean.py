from prefect import task
from prefect.artifacts import create_link_artifact
from prefect.cache_policies import NO_CACHE
from prefect.logging import get_run_logger

from pointvl.config import BuildConfig
from pointvl.local import cleaning_report_path, plan_run


@task(name="clean", cache_policy=NO_CACHE)
def clean(shapenet: str, run_dir: str, config: BuildConfig) -> int:
    """Clean the taxonomy and models, split by model, and fix the shard plan; returns the shard count."""
    plan = plan_run(shapenet, run_dir, config)
    create_link_artifact(
        key="cleaning-report", link=cleaning_report_path(run_dir), description="Kept and dropped models, with reasons"
    )
    get_run_logger().info("%d shards planned", len(plan.shards))
    return len(plan.shards)
