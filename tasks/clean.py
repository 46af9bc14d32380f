from prefect import task
from prefect.artifacts import create_link_artifact, create_progress_artifact, update_progress_artifact
from prefect.cache_policies import NO_CACHE
from prefect.logging import get_run_logger

from pointvl.core.progress import Progress
from pointvl.dataset.config import BuildConfig
from pointvl.dataset.executor import Executor
from pointvl.dataset.handoff import build_id
from pointvl.dataset.run_folder import RunFolder
from pointvl.dataset.runner import plan_run


@task(name="clean", cache_policy=NO_CACHE)
def clean(
    shapenet: str, run_dir: str, config: BuildConfig, incremental: bool = False, executor: Executor | None = None
) -> list[int]:
    """Clean the taxonomy and models, split by model, and fix the shard plan; returns the shards to build.

    A shard whose models all left in an incremental build keeps its index but is not built (no
    stage handles an empty shard, and it has no records).

    ``incremental``: extend the run folder's plan to the current input and config, and move outputs
    made for another config or model list aside (:func:`pointvl.dataset.runner.plan_run`).

    The mesh validation runs on ``executor``'s workers; its i/n, rate and ETA are the progress
    artifact ``progress-clean`` (the build id, which other keys carry, comes from the plan made here).
    """
    artifact = None

    def publish(p: Progress) -> None:
        nonlocal artifact
        percent = 100.0 * p.done / p.total if p.total else 100.0
        if artifact is None:
            artifact = create_progress_artifact(percent, key="progress-clean", description=p.line())
        else:
            update_progress_artifact(artifact, percent, description=p.line())

    plan = plan_run(shapenet, run_dir, config, incremental, executor, publish)
    create_link_artifact(key=f"cleaning-report-{build_id(run_dir)}", link=RunFolder.of(run_dir).cleaning_report,
                         description="Kept and dropped models, with reasons")
    get_run_logger().info("%d shards planned", len(plan.shards))
    return [s.index for s in plan.shards if s.models]
