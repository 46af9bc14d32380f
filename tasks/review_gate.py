"""The review gate of the build: the items in pages, each page one form in the Prefect UI, a timeout policy.

    for each shard under review, for each page of ``review.page_size`` items (flagged first):
        page sheet + form (approve the page | reject ids of the page | approve the rest of the build)
        ─► suspend ─► the answer is kept in RUN/reports/review_pages/ ─► next page
    a shard whose pages are all answered gets its review table at once (apply_review)
    no answer in ``review.timeout_s``: ``review.timeout_policy`` decides for the pages not answered

A deployed build **suspends** (``suspend_flow_run``) once per page: its process exits and frees the
worker, the run waits holding the run folder's lock, and the reviewer's answer reschedules it; the
re-entered flow skips every finished stage without re-cleaning the input (``flows/build.py``) and
comes back here, where it reads the answer it was given (and when: the input's creation time) before
asking for the next page. Why a suspend per page: the form is then small whatever the build's size
(a page's ids as choices, one sheet of ``page_size`` items), every answer is on disk before the next
page is asked, so a restart of the server, the worker or the day loses at most the page on screen,
and the mechanism is the one the build already had (no process waits on a person). A page never
spans two shards, so the pages of a shard are a function of its tables alone.

The sheets are served by a preview process of their own (:func:`pointvl.dataset.preview.serve_detached`)
or from ``review.preview_base_url``. ``RUN/reports/review_pending.json`` names the waiting flow run and
its page for ``pointvl review RUN_DIR``. When the wait expires, Prefect fails the suspended run; a run
of the same deployment scheduled for just after the deadline (moved on with each answer) applies the
timeout policy to the pages that were not answered.

A build started outside a deployment with ``gate: on`` (no deployment to reschedule) pauses in its
process instead, page after page. An answer naming ids not on the page asks again, saying why."""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime, timedelta
from typing import Literal

from prefect import task
from prefect.artifacts import create_image_artifact, create_progress_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.client.orchestration import get_client
from prefect.context import get_run_context
from prefect.deployments import run_deployment
from prefect.exceptions import FlowPauseTimeout, ObjectNotFound
from prefect.flow_runs import pause_flow_run, suspend_flow_run
from prefect.input import RunInput
from prefect.input.run_input import keyset_from_base_key
from prefect.logging import get_run_logger
from prefect.states import Running, Scheduled
from pydantic import BaseModel, Field, create_model

from pointvl.core import io
from pointvl.dataset.preview import serve_detached, stop_detached
from pointvl.dataset.run_folder import RunFolder
from pointvl.dataset.stages.review import (
    ReviewConfig,
    apply_decisions,
    items,
    now_iso,
    page_answers,
    paged_decisions,
    policy_decisions,
    policy_rest,
    save_page_answer,
    shard_pages,
    unreviewed,
    write_page_sheet,
)
from pointvl.tasks.artifacts import artifact_key

logger = logging.getLogger(__name__)

TIMEOUT_GRACE_S = 60
"""The timeout follow-up run starts this long after the deadline (Prefect fails the expired run first)."""


class RejectedItem(BaseModel):
    instance_id: str = Field(description="an instance id from the page's sheet")
    reason: str = Field(description="why it must not reach the benchmark")


class ReviewInput(RunInput):
    """One page's form: the items to leave out (everything else on the page is approved), who answers,
    and whether to approve the rest of the build. Few fields on purpose: the UI's resume dialog gives
    the description (the sheet) only the height the fields leave (~7 px at 1400x1000 with seven)."""

    approve_rest: bool = Field(default=False, description="and approve all items not reviewed yet (ends the review)")
    reviewer: str = Field(default="", description="your name, for the review log")
    reject: list[str] = Field(default_factory=list, description="items to leave out")
    reject_reason: str = Field(default="rejected in review", description="why (for the items under reject)")
    rejected: list[RejectedItem] = Field(default_factory=list, description="or: items with a reason each")
    source: str = Field(default="prefect form", description="pointvl review sets cli")


def review_form(ids: list[str]) -> type[ReviewInput]:
    """:class:`ReviewInput` plus ``reject``: the page's ids as choices (flagged first), so nobody copies ids."""
    if not ids:
        return ReviewInput
    choice = Literal[tuple(ids)]  # type: ignore[valid-type]
    return create_model("ReviewInput", __base__=ReviewInput, reject=(
        list[choice], Field(default_factory=list, description="items of this page to leave out (flagged first)")))


def gate_is_on(config: ReviewConfig) -> bool:
    """``on``; ``off``; ``auto`` = on when this build was started from a deployment (scheduled or deployed)."""
    if config.gate != "auto":
        return config.gate == "on"
    return get_run_context().flow_run.deployment_id is not None


def review_gate(run_dir: str, shard_indices: list[int], config: ReviewConfig, build_id: str) -> dict:
    """Review the shards not reviewed yet, page by page; returns ``{"approved": n, "rejected": n}`` of the
    shards whose review tables this call wrote."""
    todo = unreviewed(run_dir, shard_indices)
    if not todo:
        return {"approved": 0, "rejected": 0}
    if not gate_is_on(config):
        return apply_review(run_dir, policy_decisions(run_dir, todo, config.timeout_policy, "gate off"), build_id)
    totals = {"approved": 0, "rejected": 0}
    expired = _expired_wait(run_dir)
    if expired:
        logger.warning("nobody reviewed shards %s before the deadline: policy %s applies to their pages not "
                       "answered", expired, config.timeout_policy)
        _add(totals, _apply_timeout(run_dir, expired, config, build_id))
        _finish_wait(run_dir)
        todo = unreviewed(run_dir, shard_indices)
    if todo:
        _add(totals, _review_pages(run_dir, todo, config, build_id,
                                   deployed=get_run_context().flow_run.deployment_id is not None))
    return totals


def reentering_review(run_dir: str) -> bool:
    """Whether this flow run is one that suspended for review and re-entered after an answer: it planned
    and built everything before the gate itself, so the build goes straight back to the gate."""
    pending = _read_pending(run_dir)
    return pending is not None and pending["flow_run_id"] == str(get_run_context().flow_run.id)


def _add(totals: dict, more: dict) -> None:
    for k in totals:
        totals[k] += more[k]


def _apply_timeout(run_dir: str, shards: list[int], config: ReviewConfig, build_id: str) -> dict:
    rest = policy_rest(config.timeout_policy, "timeout")
    return apply_review(run_dir, {i: paged_decisions(run_dir, i, config.page_size, rest) for i in shards}, build_id)


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


def _start_wait(run_dir: str, todo: list[int], config: ReviewConfig, build_id: str, deployed: bool) -> dict:
    """The review's record: its shards and their sizes, the sheets' base URL, the deadline and (deployed)
    the follow-up run that applies the timeout policy after it."""
    folder = RunFolder.of(run_dir)
    run = get_run_context().flow_run
    base_url = config.preview_base_url or serve_detached(
        folder.previews, folder.preview_server, folder.log("preview.log"), config.preview_host, config.preview_port)
    deadline = datetime.now(UTC) + timedelta(seconds=config.timeout_s)
    follow_up = None
    if deployed:
        follow_up = str(run_deployment(
            name=run.deployment_id, parameters=run.parameters, timeout=0, as_subflow=False,
            scheduled_time=deadline + timedelta(seconds=TIMEOUT_GRACE_S),
            flow_run_name=f"review-timeout-{build_id}", tags=["review-timeout", f"build:{build_id}"]).id)
    pending = {"flow_run_id": str(run.id), "run_dir": run_dir, "shards": todo, "base_url": base_url,
               "counts": {str(i): len(items(run_dir, i)) for i in todo}, "page_size": config.page_size,
               "expires_at": deadline.timestamp(), "timeout_run_id": follow_up, "page": None}
    io.write_json(folder.review_pending, pending)
    return pending


def _next_page(run_dir: str, todo: list[int], config: ReviewConfig, build_id: str, done: set[int],
               totals: dict) -> tuple[int, int, list] | None:
    """The first page not answered (shard, page, its items); shards whose pages are all answered get
    their review tables on the way (and join ``done``)."""
    complete = {}
    page = None
    for i in todo:
        if i in done:
            continue
        pages = shard_pages(run_dir, i, config.page_size)
        answered = page_answers(run_dir, i, pages)
        if len(answered) == len(pages):
            complete[i] = paged_decisions(run_dir, i, config.page_size, None)
            continue
        j = min(set(range(len(pages))) - set(answered))
        page = (i, j, pages[j])
        break
    if complete:
        _add(totals, apply_review(run_dir, complete, build_id))
        done.update(complete)
    return page


def _review_pages(run_dir: str, todo: list[int], config: ReviewConfig, build_id: str, deployed: bool) -> dict:
    folder = RunFolder.of(run_dir)
    run_id = get_run_context().flow_run.id
    pending = _read_pending(run_dir)
    if pending is None or pending["flow_run_id"] != str(run_id):
        pending = _start_wait(run_dir, todo, config, build_id, deployed)
    totals, done = {"approved": 0, "rejected": 0}, set()
    while (page := _next_page(run_dir, todo, config, build_id, done, totals)) is not None:
        shard, j, page_items = page
        ids = [it.instance_id for it in page_items]
        current = pending.get("page") or {}
        if (current.get("shard"), current.get("page")) != (shard, j):
            current = {"shard": shard, "page": j, "attempt": 0, "error": ""}
        key = f"review-{shard:05d}-{j:03d}-{current['attempt']}"
        form = review_form(ids)
        answer, at = _given_answer(run_id, key, form) if deployed else (None, "")
        if answer is None:
            progress = _progress(run_dir, pending)
            url = _show_page(run_dir, shard, j, config, pending, build_id, progress)
            pending["page"] = {**current, "ids": ids, "sheet": url, "key": key}
            io.write_json(folder.review_pending, pending)
            description = _description(shard, j, page_items, url, config, progress, current["error"])
            remaining = max(1, int(pending["expires_at"] - time.time()))
            try:
                answer = _ask(form.with_initial_data(description=description), remaining, key, config, deployed)
            except FlowPauseTimeout:  # in-process only: a deployed run is failed by Prefect, see _expired_wait
                logger.warning("nobody reviewed within %d s: policy %s applies", config.timeout_s,
                               config.timeout_policy)
                with get_client(sync_client=True) as client:  # the server refuses to leave an expired pause
                    client.set_flow_run_state(run_id, Running(message="review timed out"), force=True)
                _add(totals, _apply_timeout(run_dir, [i for i in todo if i not in done], config, build_id))
                break
            at = now_iso()
        try:
            _record(run_dir, shard, j, ids, answer, at)
        except ValueError as err:  # a typo or an id of another page: ask again, saying what was wrong
            logger.warning("review answer refused: %s", err)
            pending["page"] = {**current, "attempt": current["attempt"] + 1, "error": str(err)}
            io.write_json(folder.review_pending, pending)
            continue
        logger.info("review: page %d of shard %05d answered by %s (%s)", j + 1, shard, answer.reviewer, at)
        if answer.approve_rest:
            rest = {"decision": "approved", "reason": "", "reviewer": answer.reviewer, "decided_at": at,
                    "source": f"{answer.source} (approve rest)"}
            left = [i for i in todo if i not in done]
            _add(totals, apply_review(run_dir, {i: paged_decisions(run_dir, i, config.page_size, rest)
                                                for i in left}, build_id))
            break
        pending = _renew_deadline(run_dir, pending, config, deployed)
    _publish_progress(run_dir, pending, build_id, _progress(run_dir, pending), final=True)
    _finish_wait(run_dir)
    return totals


def _ask(form: type[ReviewInput], remaining: int, key: str, config: ReviewConfig, deployed: bool) -> ReviewInput:
    if deployed:
        # Raises Pause (the process exits); the re-entered run finds the answer with _given_answer.
        return suspend_flow_run(wait_for_input=form, timeout=remaining, key=key)
    return pause_flow_run(wait_for_input=form, timeout=remaining, poll_interval=config.poll_s, key=key)


def _given_answer(run_id: object, key: str, form: type[ReviewInput]) -> tuple[ReviewInput | None, str]:
    """The answer given to the suspended page ``key`` and when it was given (the input's creation time), or
    ``(None, "")``. Read here rather than by calling ``suspend_flow_run`` again, which logs "Suspending
    flow run..." before the server turns it down. The server stores an answer under the keyset of
    ``suspended-<key>`` (prefect/input/run_input.py:126-127 and server/api/flow_runs.py:563-570, 3.8.8)."""
    response = keyset_from_base_key(f"suspended-{key}")["response"]
    with get_client(sync_client=True) as client:
        found = client.filter_flow_run_input(run_id, response, 1, set())
    if not found or found[0].key != response:
        return None, ""
    return form.load_from_flow_run_input(found[0]), found[0].created.astimezone(UTC).isoformat(timespec="seconds")


def _record(run_dir: str, shard: int, page: int, ids: list[str], answer: ReviewInput, at: str) -> None:
    rejected = {r.instance_id: r.reason for r in answer.rejected}
    for iid in answer.reject:
        rejected.setdefault(iid, answer.reject_reason)
    save_page_answer(run_dir, shard, page, ids, rejected, answer.reviewer, at, answer.source)


def _renew_deadline(run_dir: str, pending: dict, config: ReviewConfig, deployed: bool) -> dict:
    """An answer restarts the wait: the next page has ``review.timeout_s`` again, and so moves the follow-up."""
    deadline = datetime.now(UTC) + timedelta(seconds=config.timeout_s)
    pending["expires_at"] = deadline.timestamp()
    if deployed and pending.get("timeout_run_id"):
        with get_client(sync_client=True) as client:
            client.set_flow_run_state(pending["timeout_run_id"], Scheduled(
                scheduled_time=deadline + timedelta(seconds=TIMEOUT_GRACE_S)), force=True)
    io.write_json(RunFolder.of(run_dir).review_pending, pending)
    return pending


def _progress(run_dir: str, pending: dict) -> dict:
    """Pages and items of this review answered so far, from the answers kept in the run folder."""
    size = pending["page_size"]
    counts = {int(i): n for i, n in pending["counts"].items()}
    answers = [io.read_json(p) for p in _answer_files(run_dir, list(counts))]
    return {"pages": sum(-(-n // size) for n in counts.values()), "answered": len(answers),
            "items": sum(counts.values()), "reviewed": sum(len(a["ids"]) for a in answers),
            "rejected": sum(len(a["rejected"]) for a in answers)}


def _answer_files(run_dir: str, shards: list[int]) -> list[str]:
    folder = io.join(RunFolder.of(run_dir).path("reports"), "review_pages")
    if not io.exists(folder):
        return []
    fs, path = io.filesystem(folder)
    wanted = {f"shard-{i:05d}-" for i in shards}
    return [io.join(folder, name.rsplit("/", 1)[-1]) for name in fs.ls(path, detail=False)
            if name.rsplit("/", 1)[-1][:12] in wanted]


def _publish_progress(run_dir: str, pending: dict, build_id: str, p: dict, final: bool = False) -> None:
    left = p["items"] - p["reviewed"]
    line = (f"page {min(p['answered'] + 1, p['pages'])} of {p['pages']}: {p['reviewed']} items reviewed, "
            f"{left} left, {p['rejected']} rejected so far")
    if final:
        line = f"review done: {p['reviewed']} items answered page by page, {p['rejected']} rejected"
    create_progress_artifact(100.0 * p["reviewed"] / max(1, p["items"]) if not final else 100.0,
                             key=artifact_key("review-progress", run_dir, build_id), description=line)


def _show_page(run_dir: str, shard: int, page: int, config: ReviewConfig, pending: dict, build_id: str,
               progress: dict) -> str:
    """Draw the page's sheet, serve it, publish it and the review's progress; returns the sheet's URL."""
    folder = RunFolder.of(run_dir)
    path, size = write_page_sheet(run_dir, shard, page, config)
    base_url = config.preview_base_url or serve_detached(
        folder.previews, folder.preview_server, folder.log("preview.log"), config.preview_host, config.preview_port)
    url = f"{base_url.rstrip('/')}/{path.rsplit('/', 1)[-1]}"
    create_image_artifact(image_url=url, key=artifact_key(f"review-shard-{shard:05d}-page-{page:03d}", run_dir,
                                                          build_id),
                          description=f"Shard {shard:05d} page {page + 1}: render | refined | photoreal")
    _publish_progress(run_dir, pending, build_id, progress)
    get_run_logger().info("review page %d of %d (shard %05d page %d): %s (%d bytes)", progress["answered"] + 1,
                          progress["pages"], shard, page + 1, url, size)
    return url


def _description(shard: int, page: int, page_items: list, url: str, config: ReviewConfig, p: dict,
                 error: str) -> str:
    flagged = [it.instance_id for it in page_items if it.flagged]
    lines = [f"**Your last answer was refused: {error}**", ""] if error else []
    lines += [
        f"**Page {p['answered'] + 1} of {p['pages']}** (shard {shard:05d} page {page + 1}: {len(page_items)} items, "
        f"{len(flagged)} flagged) · {p['reviewed']} of {p['items']} reviewed, {p['rejected']} rejected · "
        f"[open the sheet at full size]({url})",
        "",
        f"![shard {shard:05d} page {page + 1}]({url})",
        "",
        f"Flagged (red frame, first): {', '.join(f'`{x}`' for x in flagged) or 'none'}. Each row: render | refined "
        "| photoreal; green box = mask, red box = the VLM's. Pick the items to leave out under *reject* (or "
        "list them with a reason each under *rejected*) and give your name: everything else on this page is "
        "approved. *Approve rest* also approves every item of the build not reviewed yet. Without an answer "
        f"in {config.timeout_s} s the policy `{config.timeout_policy}` applies to the pages not answered.",
    ]
    return "\n".join(lines)


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
        key=artifact_key("review-decisions", run_dir, build_id),
        table=rejected or [{"shard": "", "instance_id": "none rejected"}],
        description=f"Review of shards {sorted(decisions)}: {approved} approved, {len(rejected)} rejected",
    )
    get_run_logger().info("review: shards %s: %d approved, %d rejected", sorted(decisions), approved, len(rejected))
    return {"approved": approved, "rejected": len(rejected)}
