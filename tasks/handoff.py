"""Prefect side of the training hand-off: start the ``train`` deployment once per build, and report a
failed training run back on the build that started it."""

from __future__ import annotations

import uuid

from prefect import task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import ArtifactCreate
from prefect.client.schemas.objects import Flow, FlowRun
from prefect.deployments import run_deployment
from prefect.logging import get_run_logger
from prefect.states import Completed, State

from pointvl.dataset.handoff import HandoffConfig, build_id, record_start, started_run, train_parameters


@task(name="start_training", cache_policy=NO_CACHE)
def start_training(run_dir: str, config: HandoffConfig, build_flow_run_id: str) -> str:
    """Create a run of ``config.deployment`` (it starts when a worker of its pool picks it up), unless
    this build (same build id) already started one; returns the training run's id."""
    bid = build_id(run_dir)
    logger = get_run_logger()
    earlier = started_run(run_dir, bid)
    if earlier is not None:
        with get_client(sync_client=True) as client:
            state = client.read_flow_run(uuid.UUID(earlier)).state
        logger.info("build %s already started training run %s (%s); not started again", bid, earlier,
                    state.name if state else "unknown")
        return earlier
    params = train_parameters(run_dir, config, build_flow_run_id)
    run = run_deployment(name=config.deployment, parameters=params, timeout=0, flow_run_name=f"train-{bid}",
                         tags=[f"build:{bid}"], as_subflow=False)
    record_start(run_dir, bid, str(run.id), config.deployment)
    create_markdown_artifact(
        key=f"training-handoff-{bid}",
        markdown=f"Build `{bid}` started training run `{run.id}` of `{config.deployment}` on `{params['shards']}` "
        f"(run folder `{params['run_dir']}`).",
    )
    logger.info("started %s run %s for build %s", config.deployment, run.id, bid)
    return str(run.id)


def report_to_build(flow: Flow, flow_run: FlowRun, state: State) -> None:
    """Hook of the training flow: a failed or crashed training run shows on the build that started it, as
    an artifact of the build's run and in its state message."""
    build_run = flow_run.parameters.get("build_flow_run_id")
    if not build_run:
        return
    message = f"training run {flow_run.name} ({flow_run.id}) {state.type.value.lower()}: {state.message}"
    with get_client(sync_client=True) as client:
        client.create_artifact(ArtifactCreate(
            key=f"training-failed-{flow_run.parameters.get('build_id') or 'build'}", type="markdown",
            description="The training hand-off failed", flow_run_id=uuid.UUID(build_run),
            data=f"# Training failed\n{message}\n\nFix it, then start `{flow.name}` again for this build's shards.",
        ))
        build = client.read_flow_run(uuid.UUID(build_run))
        if build.state is not None and build.state.is_completed():
            client.set_flow_run_state(build.id, Completed(message=message), force=True)
