"""The review gate of the build: contact sheets in the Prefect UI, a typed form, a timeout policy.

    contact_sheets ─► suspend (form: approve all | rejected ids, reviewer) ─► apply_review
                        └─ no answer in ``review.timeout_s``: ``review.timeout_policy`` decides

A deployed build **suspends** (``suspend_flow_run``): its process exits and frees the worker, the run
waits as long as ``review.timeout_s`` (a day by default) holding the run folder's lock, and the
reviewer's answer reschedules it; the re-entered flow skips every finished stage and comes back
here, where the answer is returned. The sheets are served by a preview process of their own
(:func:`pointvl.dataset.preview.serve_detached`) or from ``review.preview_base_url``, so they stay visible
while no build process runs. ``RUN/reports/review_pending.json`` names the waiting flow run for
``pointvl review RUN_DIR``. When the wait expires, Prefect fails the suspended run; a run of the same
deployment scheduled for just after the deadline (or any later build of the folder) applies the
timeout policy to the shards that waited.

A build started outside a deployment with ``gate: on`` (no deployment to reschedule) pauses in its
process instead, serving the sheets itself. An answer naming unknown ids asks again, saying why.
"""

from __future__ import annotations

import hashlib
import logging
import time
from datetime import UTC, datetime, timedelta
from typing import Literal

from prefect.client.orchestration import get_client
from prefect.context import get_run_context
from prefect.deployments import run_deployment
from prefect.exceptions import FlowPauseTimeout, ObjectNotFound
from prefect.flow_runs import pause_flow_run, suspend_flow_run
from prefect.input import RunInput
from prefect.states import Running
from pydantic import BaseModel, Field, create_model

from pointvl.core import io
from pointvl.dataset.preview import PreviewServer, serve_detached, stop_detached
from pointvl.dataset.run_folder import RunFolder
from pointvl.dataset.stages.review import (
    ReviewConfig,
    form_decisions,
    items,
    policy_decisions,
    unreviewed,
)
from tasks.review import apply_review, contact_sheets

logger = logging.getLogger(__name__)

TIMEOUT_GRACE_S = 60
"""The timeout follow-up run starts this long after the deadline (Prefect fails the expired run first)."""
MAX_CHOICES = 5000
"""Up to this many items under review, every id is a choice in the form; beyond, the flagged ones."""


class RejectedItem(BaseModel):
    instance_id: str = Field(description="an instance id from a contact sheet")
    reason: str = Field(description="why it must not reach the benchmark")


class ReviewInput(RunInput):
    """The review form: approve everything, or list the rejected items (everything else is approved)."""

    approve_all: bool = Field(default=False, description="approve every item of the shards under review")
    rejected: list[RejectedItem] = Field(default_factory=list, description="items to leave out, with a reason")
    reviewer: str = Field(default="", description="your name (kept in the review log and the records)")
    reject: list[str] = Field(default_factory=list, description="items to leave out")
    reject_reason: str = Field(default="rejected in review", description="the reason for the items in reject")
    source: str = Field(default="prefect form", description="where the answer came from (pointvl review sets cli)")


def review_form(ids: list[str]) -> type[ReviewInput]:
    """:class:`ReviewInput` plus ``reject``: the ids under review as choices, so nobody copies ids."""
    if not ids:
        return ReviewInput
    choice = Literal[tuple(ids)]  # type: ignore[valid-type]
    return create_model("ReviewInput", __base__=ReviewInput, reject=(
        list[choice], Field(default_factory=list, description="items to leave out (flagged ones first)")))


def gate_is_on(config: ReviewConfig) -> bool:
    """``on``; ``off``; ``auto`` = on when this build was started from a deployment (scheduled or deployed)."""
    if config.gate != "auto":
        return config.gate == "on"
    return get_run_context().flow_run.deployment_id is not None


def review_gate(run_dir: str, shard_indices: list[int], config: ReviewConfig, build_id: str) -> dict:
    """Review the shards not reviewed yet; returns ``{"approved": n, "rejected": n}`` for them."""
    todo = unreviewed(run_dir, shard_indices)
    if not todo:
        return {"approved": 0, "rejected": 0}
    if not gate_is_on(config):
        return apply_review(run_dir, policy_decisions(run_dir, todo, config.timeout_policy, "gate off"), build_id)
    expired = _expired_wait(run_dir)
    if expired:
        logger.warning("nobody reviewed shards %s before the deadline: policy %s applies", expired,
                       config.timeout_policy)
        apply_review(run_dir, policy_decisions(run_dir, expired, config.timeout_policy, "timeout"), build_id)
        _finish_wait(run_dir)
        todo = unreviewed(run_dir, shard_indices)
        if not todo:
            return {"approved": 0, "rejected": 0}
    if get_run_context().flow_run.deployment_id is None:
        return _pause_in_process(run_dir, todo, config, build_id)
    return _suspend(run_dir, todo, config, build_id)


def _read_pending(run_dir: str) -> dict | None:
    folder = RunFolder.of(run_dir)
    return io.read_json(folder.review_pending) if io.exists(folder.review_pending) else None


def _expired_wait(run_dir: str) -> list[int]:
    """Shards of another flow run's review whose deadline passed without an answer."""
    pending = _read_pending(run_dir)
    run_id = str(get_run_context().flow_run.id)
    if pending is None or pending["flow_run_id"] == run_id or time.time() < pending.get("expires_at", 0):
        return []
    return unreviewed(run_dir, pending["shards"])


def _finish_wait(run_dir: str) -> None:
    """The wait is over: stop its preview server, drop its timeout follow-up and its pending file."""
    folder = RunFolder.of(run_dir)
    pending = _read_pending(run_dir)
    stop_detached(folder.preview_server)
    follow_up = (pending or {}).get("timeout_run_id")
    if follow_up and follow_up != str(get_run_context().flow_run.id):
        try:
            with get_client(sync_client=True) as client:
                client.delete_flow_run(follow_up)
        except ObjectNotFound:
            pass
    if pending is not None:
        fs, path = io.filesystem(folder.review_pending)
        fs.rm(path)


def _flagged(run_dir: str, todo: list[int]) -> dict[int, list[str]]:
    return {i: [it.instance_id for it in items(run_dir, i) if it.flagged] for i in todo}


def _choices(run_dir: str, todo: list[int], flagged: dict[int, list[str]]) -> list[str]:
    first = [x for i in todo for x in flagged[i]]
    rest = [it.instance_id for i in todo for it in items(run_dir, i) if not it.flagged]
    return first + rest if len(first) + len(rest) <= MAX_CHOICES else first


def _decisions(run_dir: str, todo: list[int], answer: ReviewInput) -> dict[int, list[dict]]:
    rejected = {r.instance_id: r.reason for r in answer.rejected}
    for iid in answer.reject:
        rejected.setdefault(iid, answer.reject_reason)
    return form_decisions(run_dir, todo, answer.approve_all, rejected, answer.reviewer, answer.source)


def _suspend(run_dir: str, todo: list[int], config: ReviewConfig, build_id: str) -> dict:
    folder = RunFolder.of(run_dir)
    run = get_run_context().flow_run
    pending = _read_pending(run_dir)
    if pending is None or pending["flow_run_id"] != str(run.id) or pending["shards"] != todo:
        base_url = config.preview_base_url or serve_detached(
            folder.previews, folder.preview_server, folder.log("preview.log"),
            config.preview_host, config.preview_port)
        urls = contact_sheets(run_dir, todo, config, base_url, build_id)
        deadline = datetime.now(UTC) + timedelta(seconds=config.timeout_s)
        follow_up = run_deployment(
            name=run.deployment_id, parameters=run.parameters, timeout=0, as_subflow=False,
            scheduled_time=deadline + timedelta(seconds=TIMEOUT_GRACE_S),
            flow_run_name=f"review-timeout-{build_id}", tags=["review-timeout", f"build:{build_id}"])
        pending = {"flow_run_id": str(run.id), "run_dir": run_dir, "shards": todo, "attempt": 0, "error": "",
                   "sheets": {str(i): u for i, u in urls.items()}, "expires_at": deadline.timestamp(),
                   "key": "review-" + hashlib.sha256(repr(todo).encode()).hexdigest()[:16],
                   "timeout_run_id": str(follow_up.id)}
        io.write_json(folder.review_pending, pending)
    elif not config.preview_base_url:  # re-entered on another worker or after a restart: serve again
        serve_detached(folder.previews, folder.preview_server, folder.log("preview.log"),
                       config.preview_host, config.preview_port)
    flagged = _flagged(run_dir, todo)
    urls = {int(i): u for i, u in pending["sheets"].items()}
    while True:
        form = review_form(_choices(run_dir, todo, flagged)).with_initial_data(
            description=_description(todo, urls, flagged, config, pending["error"]))
        remaining = max(1, int(pending["expires_at"] - time.time()))
        # Raises Pause (the process exits) the first time; returns the answer when the run re-enters.
        answer = suspend_flow_run(wait_for_input=form, timeout=remaining, key=f"{pending['key']}-{pending['attempt']}")
        try:
            decisions = _decisions(run_dir, todo, answer)
            break
        except ValueError as err:  # a typo in an id: ask again, saying what was wrong
            logger.warning("review answer refused: %s", err)
            pending.update(attempt=pending["attempt"] + 1, error=str(err))
            io.write_json(folder.review_pending, pending)
    result = apply_review(run_dir, decisions, build_id)
    _finish_wait(run_dir)
    return result


def _pause_in_process(run_dir: str, todo: list[int], config: ReviewConfig, build_id: str) -> dict:
    folder = RunFolder.of(run_dir)
    flow_run_id = get_run_context().flow_run.id
    with PreviewServer(folder.previews, config.preview_host, config.preview_port,
                       config.preview_base_url) as server:
        urls = contact_sheets(run_dir, todo, config, server.url, build_id)
        flagged = _flagged(run_dir, todo)
        io.write_json(folder.review_pending, {"flow_run_id": str(flow_run_id), "run_dir": run_dir, "shards": todo,
                                              "sheets": {str(i): u for i, u in urls.items()},
                                              "expires_at": time.time() + config.timeout_s})
        error = ""
        try:
            while True:
                answer = pause_flow_run(
                    wait_for_input=review_form(_choices(run_dir, todo, flagged)).with_initial_data(
                        description=_description(todo, urls, flagged, config, error)),
                    timeout=config.timeout_s, poll_interval=config.poll_s,
                )
                try:
                    decisions = _decisions(run_dir, todo, answer)
                    break
                except ValueError as err:
                    error = str(err)
                    logger.warning("review answer refused: %s", err)
        except FlowPauseTimeout:
            logger.warning("nobody reviewed within %d s: policy %s applies", config.timeout_s, config.timeout_policy)
            with get_client(sync_client=True) as client:  # the server refuses to leave an expired pause
                client.set_flow_run_state(flow_run_id, Running(message="review timed out"), force=True)
            decisions = policy_decisions(run_dir, todo, config.timeout_policy, "timeout")
    result = apply_review(run_dir, decisions, build_id)
    fs, path = io.filesystem(folder.review_pending)
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
        "red frame and come first. Tick *approve all*, or pick the items to leave out under *reject* (or list "
        "them with a reason each under *rejected*); everything not listed is approved. Without an answer in "
        f"{config.timeout_s} s the policy `{config.timeout_policy}` applies.",
        "",
    ]
    for i in todo:
        ids = ", ".join(f"`{x}`" for x in flagged[i]) or "none"
        lines += [f"## Shard {i:05d}", f"Flagged: {ids}", "", f"![shard {i:05d}]({urls[i]})", ""]
    return "\n".join(lines)
