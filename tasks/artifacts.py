"""Artifacts the build and evaluation publish: progress and stats per stage, the build's summary and counts, the
evaluation report. Every key is :func:`artifact_key`'s ``<kind>-<run folder tag>-<build id>`` (e.g.
``progress-render-3f2a1c-0123456789ab``): two run folders built with one config (one build id) keep apart.

Each artifact is an API call: progress is updated at most every :data:`UPDATE_EVERY_S` seconds (and
when the stage ends), and a stage's shard stats are one table, not an artifact per shard."""

from __future__ import annotations

import hashlib
import os
import time
from typing import Any

from prefect import task
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.cache_policies import NO_CACHE
from prefect.futures import PrefectFuture, as_completed

from pointvl.core import io
from pointvl.core import io as pio
from pointvl.dataset.summary import dataset_card, passthrough_line
from pointvl.dataset.tables import finished, read_stats
from pointvl.evaluation.report import report

UPDATE_EVERY_S = 2.0


def artifact_key(kind: str, run_dir: str, build_id: str) -> str:
    """``<kind>-<run folder tag>-<build id>``: unique per run folder (two folders built with one config share
    a build id) and ending in the build id. Prefect keys allow lowercase letters, digits and dashes only."""
    where = run_dir if io.is_url(run_dir) else os.path.realpath(run_dir)
    tag = hashlib.sha256(where.rstrip("/").encode()).hexdigest()[:6]
    return f"{kind.replace('_', '-').lower()}-{tag}-{build_id}"


def wait_with_progress(stage: str, futures: list[PrefectFuture], run_dir: str, build_id: str) -> list[Any]:
    """Wait for a stage's shard futures, updating its progress artifact; returns the results in order
    (raising the first failure's exception)."""
    total = len(futures)
    key = artifact_key(f"progress-{stage}", run_dir, build_id)
    artifact = create_progress_artifact(0.0 if total else 100.0, key=key, description=f"{stage}: 0/{total}")
    shown = time.monotonic()
    for n, _ in enumerate(as_completed(futures), 1):
        if n == total or time.monotonic() - shown >= UPDATE_EVERY_S:
            update_progress_artifact(artifact, 100.0 * n / total, description=f"{stage}: {n}/{total} shards")
            shown = time.monotonic()
    return [f.result() for f in futures]


def publish_finished(run_dir: str, stage: str, shard_indices: list[int], build_id: str) -> float:
    """For a stage run elsewhere (a GPU pool's deployment): its progress, the share of ``shard_indices``
    whose table exists and checks out, and those shards' stats from the run folder; returns the share."""
    done = [i for i in shard_indices if finished(run_dir, stage, i)]  # each table verified once
    progress = 100.0 * len(done) / len(shard_indices) if shard_indices else 100.0
    create_progress_artifact(progress, key=artifact_key(f"progress-{stage}", run_dir, build_id),
                             description=f"{stage}: {len(done)}/{len(shard_indices)} shards")
    publish_stats(stage, {i: read_stats(run_dir, stage, i) for i in done}, run_dir, build_id)
    return progress


def publish_stats(stage: str, stats: dict[int, dict], run_dir: str, build_id: str) -> list[dict]:
    """A table of each shard's scalar stats (counts, seconds, backend); returns its rows."""
    scalar = (int, float, str, bool)
    rows = [{"shard": i, **{k: v for k, v in shard.items() if isinstance(v, scalar) and k != "skipped"}}
            for i, shard in stats.items()]
    create_table_artifact(rows, key=artifact_key(f"stats-{stage}", run_dir, build_id),
                          description=f"{stage}: stats per shard")
    return rows


@task(name="publish_summary", cache_policy=NO_CACHE)
def publish_summary(run_dir: str, summary: dict, build_id: str) -> None:
    """Write the dataset card beside the shards and publish the build's counts as artifacts."""
    io.write_bytes(io.join(summary["shards_dir"], "README.md"), dataset_card(summary).encode())
    create_table_artifact(
        key=artifact_key("build-counts", run_dir, build_id),
        table=[{"split/category": k, "records": v} for k, v in summary["per_split_category"].items()],
        description=f"Records per split and category ({summary['records']} in all)",
    )
    create_markdown_artifact(
        key=artifact_key("build-summary", run_dir, build_id),
        markdown="\n".join(
            [f"# Build summary ({build_id})"]
            + ([f"**Warning: {passthrough_line(summary)}.**"] if passthrough_line(summary) else [])
            + [f"Run folder: `{run_dir}`",
             f"Flagged for review: {summary['flagged']}; reviewed: {summary['review']['approved']} approved, "
             f"{summary['review']['rejected']} rejected, {summary['review']['held']} held "
             "(decisions: `reports/review_log.jsonl`)",
             "", "| dropped (stage:reason) | n |", "|---|---|"]
            + [f"| {k} | {v} |" for k, v in summary["dropped"].items()]
            + ["", "| backend | records |", "|---|---|"]
            + [f"| {k} | {v} |" for k, v in summary["backends"].items()]
        ),
    )


@task(name="report", cache_policy=NO_CACHE)
def publish_report(shards_dir: str, run_dir: str, name: str, build_id: str) -> str:
    """Write RUN/report/ (tables, plots, JSON) for the run's test predictions and its training curves;
    publish the tables as a markdown artifact (``eval-report-…-<build id>``: the build of ``shards_dir``), with
    the plots' paths (the UI shows no local images)."""
    out = pio.join(run_dir, "report")
    text = report(shards_dir, out, {name: pio.join(run_dir, "eval", "predictions.jsonl")}, train_run=run_dir)
    body = "\n".join(line if not line.startswith("![") else
                     f"- {line[2:line.index(']')]}: `{pio.join(out, line[line.index('(') + 1:-1])}`"
                     for line in text.splitlines())
    create_markdown_artifact(key=artifact_key("eval-report", run_dir, build_id), markdown=body,
                             description=f"Evaluation report of {run_dir}")
    return pio.join(out, "report.md")
