"""Prefect task: start the ``train`` deployment on a finished build's shards."""

from __future__ import annotations

from prefect import task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.deployments import run_deployment
from prefect.logging import get_run_logger

from pointvl.handoff import HandoffConfig, build_id, train_parameters


@task(name="start_training", cache_policy=NO_CACHE)
def start_training(run_dir: str, config: HandoffConfig) -> str:
    """Create a run of ``config.deployment`` (it starts when a worker of its pool picks it up); returns its id."""
    bid = build_id(run_dir)
    params = train_parameters(run_dir, config)
    run = run_deployment(name=config.deployment, parameters=params, timeout=0, flow_run_name=f"train-{bid}",
                         tags=[f"build:{bid}"], as_subflow=False)
    create_markdown_artifact(
        key="training-handoff",
        markdown=f"Build `{bid}` started training run `{run.id}` of `{config.deployment}` on `{params['shards']}` "
        f"(run folder `{params['run_dir']}`).",
    )
    get_run_logger().info("started %s run %s for build %s", config.deployment, run.id, bid)
    return str(run.id)
