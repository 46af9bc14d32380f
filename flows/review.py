"""The review gate of the build: contact sheets in the Prefect UI, a typed form, a timeout policy.

    contact_sheets ─► pause (form: approve all | rejected ids + reasons, reviewer) ─► apply_review
                        └─ no answer in ``review.timeout_s``: ``review.timeout_policy`` decides

The build calls :func:`review_gate` between annotation and write_shards. While it waits, it serves
``RUN/previews/`` over HTTP (:class:`pointvl.preview.PreviewServer`) so the image artifacts and the
form's description show the sheets, and writes ``RUN/reports/review_pending.json`` naming the flow
run, so ``pointvl review RUN_DIR`` can answer from a terminal. An answer that names unknown ids
pauses again with the error in the description. Shards already reviewed are skipped on a re-run.
"""

from __future__ import annotations

import logging

from prefect.client.orchestration import get_client
from prefect.context import get_run_context
from prefect.exceptions import FlowPauseTimeout
from prefect.flow_runs import pause_flow_run
from prefect.input import RunInput
from prefect.states import Running
from pydantic import BaseModel, Field

from pointvl import io
from pointvl.preview import PreviewServer
from pointvl.stages.review import (
    ReviewConfig,
    form_decisions,
    items,
    pending_path,
    policy_decisions,
    previews_dir,
    unreviewed,
)
from tasks.review import apply_review, contact_sheets

logger = logging.getLogger(__name__)


class RejectedItem(BaseModel):
    instance_id: str = Field(description="an instance id from a contact sheet")
    reason: str = Field(description="why it must not reach the benchmark")


class ReviewInput(RunInput):
    """The review form: approve everything, or list the rejected items (everything else is approved)."""

    approve_all: bool = Field(default=False, description="approve every item of the shards under review")
    rejected: list[RejectedItem] = Field(default_factory=list, description="items to leave out, with a reason")
    reviewer: str = Field(default="", description="your name (kept in the review log and the records)")


def gate_is_on(config: ReviewConfig) -> bool:
    """``on``; ``off``; ``auto`` = on when this build was started from a deployment (scheduled or deployed)."""
    if config.gate != "auto":
        return config.gate == "on"
    return get_run_context().flow_run.deployment_id is not None


def review_gate(run_dir: str, shard_indices: list[int], config: ReviewConfig) -> dict:
    """Review the shards not reviewed yet; returns ``{"approved": n, "rejected": n}`` for them."""
    todo = unreviewed(run_dir, shard_indices)
    if not todo:
        return {"approved": 0, "rejected": 0}
    if not gate_is_on(config):
        return apply_review(run_dir, policy_decisions(run_dir, todo, config.timeout_policy, "gate off"))
    flow_run_id = get_run_context().flow_run.id
    with PreviewServer(previews_dir(run_dir), config.preview_host, config.preview_port,
                       config.preview_base_url) as server:
        urls = contact_sheets(run_dir, todo, config, server.url)
        flagged = {i: [it.instance_id for it in items(run_dir, i) if it.flagged] for i in todo}
        io.write_json(pending_path(run_dir), {"flow_run_id": str(flow_run_id), "run_dir": run_dir, "shards": todo,
                                              "sheets": {str(i): u for i, u in urls.items()}})
        error = ""
        try:
            while True:
                answer = pause_flow_run(
                    wait_for_input=ReviewInput.with_initial_data(
                        description=_description(todo, urls, flagged, config, error)),
                    timeout=config.timeout_s, poll_interval=config.poll_s,
                )
                rejected = {r.instance_id: r.reason for r in answer.rejected}
                try:
                    decisions = form_decisions(run_dir, todo, answer.approve_all, rejected, answer.reviewer,
                                               "prefect form")
                    break
                except ValueError as err:  # a typo in an id: ask again, saying what was wrong
                    error = str(err)
                    logger.warning("review answer refused: %s", err)
        except FlowPauseTimeout:
            logger.warning("nobody reviewed within %d s: policy %s applies", config.timeout_s, config.timeout_policy)
            with get_client(sync_client=True) as client:  # the server refuses to leave an expired pause
                client.set_flow_run_state(flow_run_id, Running(message="review timed out"), force=True)
            decisions = policy_decisions(run_dir, todo, config.timeout_policy, "timeout")
    result = apply_review(run_dir, decisions)
    fs, path = io.filesystem(pending_path(run_dir))
    fs.rm(path)
    return result


def _description(todo: list[int], urls: dict[int, str], flagged: dict[int, list[str]], config: ReviewConfig,
                 error: str) -> str:
    lines = []
    if error:
        lines += [f"**Your last answer was refused: {error}**", ""]
    lines += [
        f"# Review {len(todo)} shard(s)",
        "Each row: render | refined | photoreal; green box = mask, red box = the VLM's. Flagged items have a "
        "red frame. Tick *approve all*, or list the rejected instance ids with a reason; everything not listed "
        f"is approved. Without an answer in {config.timeout_s} s the policy `{config.timeout_policy}` applies.",
        "",
    ]
    for i in todo:
        ids = ", ".join(f"`{x}`" for x in flagged[i]) or "none"
        lines += [f"## Shard {i:05d}", f"Flagged: {ids}", "", f"![shard {i:05d}]({urls[i]})", ""]
    return "\n".join(lines)
