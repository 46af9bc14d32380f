"""Prefect tasks of the training flow: thin wrappers over ``pointvl.train.pipeline``."""

from __future__ import annotations

from prefect import task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.logging import get_run_logger

from pointvl.evaluate import format_table
from pointvl.train import pipeline
from pointvl.train.config import TrainConfig


@task(name="train-stage", cache_policy=NO_CACHE, task_run_name="{stage}")
def train_stage(config: TrainConfig, shards_dir: str, run_dir: str, stage: str, init_from: str | None) -> str:
    """One training stage (skipped when its checkpoint exists); returns the checkpoint folder."""
    folder = pipeline.train_stage(config, shards_dir, run_dir, stage, init_from)
    get_run_logger().info("%s checkpoint: %s", stage, folder)
    return folder


@task(name="evaluate", cache_policy=NO_CACHE)
def evaluate(config: TrainConfig, shards_dir: str, run_dir: str, checkpoint: str, name: str) -> dict:
    """Predict and score the test split; publishes the metrics table as an artifact."""
    metrics = pipeline.evaluate_stage(config, shards_dir, run_dir, checkpoint)
    create_markdown_artifact(key="train-metrics", markdown=format_table(metrics, name=name),
                             description=f"Test metrics of {run_dir}")
    return metrics


@task(name="training-curves", cache_policy=NO_CACHE)
def training_curves(run_dir: str, stages: list[str]) -> str:
    """Plot the stages' curves to RUN/curves.png and link it as an artifact."""
    path = pipeline.plot_curves(run_dir, stages)
    create_markdown_artifact(key="training-curves", markdown=f"Training curves: `{path}`",
                             description="loss and mean rewards per optimizer step")
    return path
