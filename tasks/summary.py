from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from pointvl.core import io
from pointvl.dataset.summary import dataset_card


@task(name="publish_summary", cache_policy=NO_CACHE)
def publish_summary(run_dir: str, summary: dict, build_id: str) -> None:
    """Write the dataset card beside the shards and publish the build's counts as artifacts."""
    io.write_bytes(io.join(summary["shards_dir"], "README.md"), dataset_card(summary).encode())
    create_table_artifact(
        key=f"build-counts-{build_id}",
        table=[{"split/category": k, "records": v} for k, v in summary["per_split_category"].items()],
        description=f"Records per split and category ({summary['records']} in all)",
    )
    create_markdown_artifact(
        key=f"build-summary-{build_id}",
        markdown="\n".join(
            [f"# Build summary ({build_id})", f"Run folder: `{run_dir}`",
             f"Flagged for review: {summary['flagged']}; reviewed: {summary['review']['approved']} approved, "
             f"{summary['review']['rejected']} rejected, {summary['review']['held']} held "
             "(decisions: `reports/review_log.jsonl`)",
             "", "| dropped (stage:reason) | n |", "|---|---|"]
            + [f"| {k} | {v} |" for k, v in summary["dropped"].items()]
            + ["", "| backend | records |", "|---|---|"]
            + [f"| {k} | {v} |" for k, v in summary["backends"].items()]
        ),
    )
