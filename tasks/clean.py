from prefect import task
from prefect.artifacts import create_link_artifact
from prefect.cache_policies import NO_CACHE
from prefect.logging import get_run_logger

from pointvl import io
from pointvl.config import BuildConfig
from pointvl.plan import fingerprint, load_plan, make_plan, plan_path, save_or_check_plan
from pointvl.stages.clean import Clean


def cleaning_report_path(run_dir: str) -> str:
    return io.join(run_dir, "reports", "cleaning.csv")


@task(name="clean", cache_policy=NO_CACHE)
def clean(shapenet: str, run_dir: str, config: BuildConfig) -> int:
    """Clean the taxonomy and models, split by model, and fix the shard plan; returns the shard count.

    A run folder that already has a plan keeps it (the plan must come from the same input and
    config), so a resumed build processes exactly the shards it started with.
    """
    logger = get_run_logger()
    views = config.render.views_per_model
    key = fingerprint(shapenet, config.to_dict())
    if io.exists(plan_path(run_dir)):
        plan = load_plan(run_dir)
        if plan.fingerprint == key:
            logger.info("plan exists: %d shards, cleaning skipped", len(plan.shards))
            return len(plan.shards)
    models = Clean(config.clean).run(shapenet, cleaning_report_path(run_dir))
    plan = save_or_check_plan(run_dir, make_plan(models, config.shard_size, views, key))
    create_link_artifact(
        key="cleaning-report", link=cleaning_report_path(run_dir), description="Kept and dropped models, with reasons"
    )
    logger.info("planned %d shards over %d models", len(plan.shards), len(models))
    return len(plan.shards)
