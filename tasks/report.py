"""Prefect task that publishes the evaluation report (``pointvl.evaluation.report``) of a training run."""

from __future__ import annotations

from prefect import task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from pointvl.core import io as pio
from pointvl.evaluation.report import report


@task(name="report", cache_policy=NO_CACHE)
def publish_report(shards_dir: str, run_dir: str, name: str) -> str:
    """Write RUN/report/ (tables, plots, JSON) for the run's test predictions and its training curves;
    publish the tables as a markdown artifact, with the plots' paths (the UI shows no local images)."""
    out = pio.join(run_dir, "report")
    text = report(shards_dir, out, {name: pio.join(run_dir, "eval", "predictions.jsonl")}, train_run=run_dir)
    body = "\n".join(line if not line.startswith("![") else
                     f"- {line[2:line.index(']')]}: `{pio.join(out, line[line.index('(') + 1:-1])}`"
                     for line in text.splitlines())
    create_markdown_artifact(key="eval-report", markdown=body, description=f"Evaluation report of {run_dir}")
    return pio.join(out, "report.md")
