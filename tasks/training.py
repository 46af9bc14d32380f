"""Prefect tasks of training: the build's hand-off (start the ``train`` deployment once per build, report a failed
training run back on the build that started it) and the training flow's stages, thin wrappers over
``pointvl.train.pipeline``."""

from __future__ import annotations

import time
import uuid
from typing import Any

from prefect import task
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.cache_policies import NO_CACHE
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import ArtifactCreate
from prefect.client.schemas.objects import Flow, FlowRun
from prefect.deployments import run_deployment
from prefect.logging import get_run_logger
from prefect.states import Completed, State

from pointvl.core import io as pio
from pointvl.dataset.handoff import HandoffConfig, build_id, record_start, started_run, train_parameters
from pointvl.dataset.plan import fingerprint
from pointvl.dataset.run_folder import RunFolder
from pointvl.evaluation.report import plot_curves
from pointvl.evaluation.scoring import format_table
from pointvl.tasks.artifacts import UPDATE_EVERY_S, artifact_key
from pointvl.train import pipeline
from pointvl.train.train_config import TrainConfig


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
        key=artifact_key("training-handoff", run_dir, bid),
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
    shards = flow_run.parameters["shards"]
    bid = flow_run.parameters.get("build_id") or shards_build_id(shards)
    message = f"training run {flow_run.name} ({flow_run.id}) {state.type.value.lower()}: {state.message}"
    with get_client(sync_client=True) as client:
        client.create_artifact(ArtifactCreate(
            key=artifact_key("training-failed", build_folder(shards), bid), type="markdown",
            description="The training hand-off failed", flow_run_id=uuid.UUID(build_run),
            data=f"# Training failed\n{message}\n\nFix it, then start `{flow.name}` again for this build's shards.",
        ))
        build = client.read_flow_run(uuid.UUID(build_run))
        if build.state is not None and build.state.is_completed():
            client.set_flow_run_state(build.id, Completed(message=message), force=True)


def build_folder(shards: str) -> str:
    """The run folder of the build that wrote ``shards`` (``RUN/shards``): the folder its hand-off keys name."""
    return shards.rstrip("/").rpartition("/")[0] or "."


def shards_build_id(shards: str) -> str:
    """The build id of a shard folder: its build's (the plan in the folder above, ``RUN/plan.json``), else, for
    shards made elsewhere, 12 hex digits of their file names and sizes."""
    if pio.exists(RunFolder.of(build_folder(shards)).plan):
        return build_id(build_folder(shards))
    if not pio.exists(shards):
        return fingerprint(shards)[:12]
    fs, path = pio.filesystem(shards)
    files = sorted((info["name"].rpartition("/")[2], info.get("size")) for info in fs.ls(path, detail=True))
    return fingerprint(files)[:12]


class StepProgress:
    """The training run's progress artifact ``train-progress-…-<build id>``: stage, step i/n, loss and mean
    rewards, updated at most every :data:`UPDATE_EVERY_S` seconds and at the stage's last step. Called by the
    library's training loop (``on_step``); each stage starts a new version of the key."""

    def __init__(self, run_dir: str, bid: str, stage: str) -> None:
        self.key, self.stage = artifact_key("train-progress", run_dir, bid), stage
        self.artifact_id: Any = None
        self.shown = 0.0

    def __call__(self, step: int, total: int, row: dict[str, float]) -> None:
        if step < total and time.monotonic() - self.shown < UPDATE_EVERY_S:
            return
        values = [f"loss {row['loss']:.4f}"] + [f"{k} {v:.3f}" for k, v in row.items() if k.startswith("reward_")]
        line = f"{self.stage} {step}/{total}: {', '.join(values)}"
        percent = 100.0 * step / total if total else 100.0
        if self.artifact_id is None:
            self.artifact_id = create_progress_artifact(percent, key=self.key, description=line)
        else:
            update_progress_artifact(self.artifact_id, percent, description=line)
        self.shown = time.monotonic()


@task(name="train-stage", cache_policy=NO_CACHE, task_run_name="{stage}")
def train_stage(config: TrainConfig, shards_dir: str, run_dir: str, stage: str, init_from: str | None,
                bid: str) -> str:
    """One training stage (skipped when its checkpoint exists); returns the checkpoint folder. Its steps show
    in the ``train-progress`` artifact."""
    folder = pipeline.train_stage(config, shards_dir, run_dir, stage, init_from,
                                  on_step=StepProgress(run_dir, bid, stage))
    get_run_logger().info("%s checkpoint: %s", stage, folder)
    return folder


@task(name="evaluate", cache_policy=NO_CACHE)
def evaluate(config: TrainConfig, shards_dir: str, run_dir: str, checkpoint: str, name: str, bid: str) -> dict:
    """Predict and score the test split; publishes the metrics table as an artifact."""
    metrics = pipeline.evaluate_stage(config, shards_dir, run_dir, checkpoint)
    create_markdown_artifact(key=artifact_key("train-metrics", run_dir, bid), markdown=format_table(metrics, name=name),
                             description=f"Test metrics of {run_dir}")
    return metrics


@task(name="training-curves", cache_policy=NO_CACHE)
def training_curves(run_dir: str, stages: list[str], bid: str) -> str:
    """Plot the stages' curves to RUN/curves.png; publish the curves as a table the UI shows (every
    k-th step, at most 40 rows a stage) with the plot's path beside it."""
    path = plot_curves(run_dir, stages)
    rows = []
    for stage in stages:
        history = pio.read_json(pio.join(run_dir, stage, "history.json"))
        every = max(1, len(history) // 40)
        for entry in history[::every] + ([history[-1]] if (len(history) - 1) % every else []):
            shown = {k: v for k, v in entry.items() if k == "step" or k.startswith(("loss", "reward_"))}
            rows.append({"stage": stage, **{k: round(v, 4) if isinstance(v, float) else v for k, v in shown.items()}})
    create_table_artifact(key=artifact_key("training-curves", run_dir, bid), table=rows,
                          description=f"Loss and mean rewards per optimizer step; plot: {path}")
    compute = pio.join(run_dir, "compute.json")
    if pio.exists(compute):
        create_markdown_artifact(key=artifact_key("training-compute", run_dir, bid),
                                 markdown=pipeline.format_compute(pio.read_json(compute)),
                                 description=f"What each stage of {run_dir} cost (compare the Table 3 variants)")
    return path
