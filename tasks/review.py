"""Prefect tasks of the review stage: contact sheets as image artifacts, decisions written and logged."""

from __future__ import annotations

from prefect import task
from prefect.artifacts import create_image_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.logging import get_run_logger

from pointvl.dataset.stages.review import ReviewConfig, apply_decisions, sheet_name, write_contact_sheets


@task(name="contact_sheets", cache_policy=NO_CACHE)
def contact_sheets(run_dir: str, shard_indices: list[int], config: ReviewConfig, base_url: str,
                   build_id: str) -> dict[int, str]:
    """Draw each shard's contact sheet under ``RUN/previews/`` and publish it as an image artifact at
    ``base_url`` (key ``review-<build id>-shard-<i>``); returns shard index → sheet URL."""
    write_contact_sheets(run_dir, shard_indices, config)
    urls = {i: f"{base_url.rstrip('/')}/{sheet_name(i)}" for i in shard_indices}
    for i, url in urls.items():
        create_image_artifact(
            image_url=url, key=f"review-{build_id}-shard-{i:05d}",
            description=f"Shard {i:05d}: render | refined | photoreal; green = mask box, red = VLM box",
        )
    get_run_logger().info("contact sheets: %s", ", ".join(urls.values()))
    return urls


@task(name="apply_review", cache_policy=NO_CACHE)
def apply_review(run_dir: str, decisions: dict[int, list[dict]], build_id: str) -> dict:
    """Write each shard's review table (and the log); publish the rejected items as a table artifact."""
    stats = {i: apply_decisions(run_dir, i, rows) for i, rows in sorted(decisions.items())}
    rejected = [
        {"shard": i, "instance_id": d["instance_id"], "reason": d["reason"], "reviewer": d["reviewer"],
         "decided_at": d["decided_at"]}
        for i, rows in sorted(decisions.items()) for d in rows if d["decision"] == "rejected"
    ]
    approved = sum(s["approved"] for s in stats.values())
    create_table_artifact(
        key=f"review-decisions-{build_id}", table=rejected or [{"shard": "", "instance_id": "none rejected"}],
        description=f"Review of shards {sorted(decisions)}: {approved} approved, {len(rejected)} rejected",
    )
    get_run_logger().info("review: %d approved, %d rejected", approved, len(rejected))
    return {"approved": approved, "rejected": len(rejected)}
