"""Prefect tasks of the training flow: thin wrappers over ``pointvl.train.pipeline``."""

from __future__ import annotations

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.logging import get_run_logger

from pointvl.core import io as pio
from pointvl.evaluation.report import plot_curves
from pointvl.evaluation.scoring import format_table
from pointvl.train import pipeline
from pointvl.train.train_config import TrainConfig


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
    create_table_artifact(key="training-curves", table=rows,
                          description=f"Loss and mean rewards per optimizer step; plot: {path}")
    compute = pio.join(run_dir, "compute.json")
    if pio.exists(compute):
        create_markdown_artifact(key="training-compute", markdown=pipeline.format_compute(pio.read_json(compute)),
                                 description=f"What each stage of {run_dir} cost (compare the Table 3 variants)")
    return path
