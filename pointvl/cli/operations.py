"""Operations commands of the ``pointvl`` CLI: ``review``, ``resume``, ``preview``.

- ``pointvl review RUN_DIR|FLOW_RUN_ID [--approve-all | --reject ID:REASON ...] [--reviewer NAME]``
  answers the review form of a build paused for review (the same form as the Prefect UI's); with
  no answer it lists the items waiting and the contact sheets.
- ``pointvl resume RUN_DIR|FLOW_RUN_ID`` re-runs a failed or stopped build with its original input
  and config: finished shards of every stage, and finished items of a GPU shard, are reused.
  A build that ran from a deployment (``RUN/reports/last_build.json`` says so) resumes as a new run of
  that deployment, on its workers and with its review gate; a local build resumes in this process.
- ``pointvl preview RUN_DIR`` serves ``RUN_DIR/previews`` (the contact sheets) until Ctrl-C.

Prefect is imported inside the commands that talk to the server, as in ``pointvl build``.
"""

from __future__ import annotations

import argparse
import getpass
import os
import time
import uuid
from typing import Any

from pointvl.core import io
from pointvl.core.errors import InputError
from pointvl.dataset.run_folder import RunFolder


def _flow_run_id(target: str) -> uuid.UUID | None:
    try:
        return uuid.UUID(target)
    except ValueError:
        return None


def _pending(run_dir: str) -> dict:

    folder = RunFolder.of(run_dir)
    if not io.exists(folder.review_pending):
        raise InputError(f"{run_dir} has no build waiting for review ({folder.review_pending} does not exist)")
    return io.read_json(folder.review_pending)


def _parse_rejections(values: list[str]) -> dict[str, str]:
    rejected = {}
    for value in values:
        iid, sep, reason = value.partition(":")
        if not sep or not iid.strip() or not reason.strip():
            raise InputError(f"--reject takes INSTANCE_ID:REASON, got {value!r}")
        rejected[iid.strip()] = reason.strip()
    return rejected


def _review(args: argparse.Namespace) -> int:
    rejected = _parse_rejections(args.reject)
    run_id = _flow_run_id(args.target)
    if run_id is None and not io.exists(RunFolder.of(args.target).review_pending):
        return _review_held(args, rejected)
    if run_id is None:
        pending = _pending(args.target)
        run_id = uuid.UUID(pending["flow_run_id"])
        page = pending.get("page")
        if page is None or "ids" not in page:
            raise InputError(f"the review of {args.target} has not shown its first page yet; try again in a moment")
        if not args.approve_all and not rejected:
            print(f"shard {page['shard']:05d} page {page['page'] + 1}: {page['sheet']}")
            for iid in page["ids"]:
                print(f"  {iid}")
            print(f"answer with: pointvl review {args.target} --approve-all (this page and the rest) | "
                  "--reject ID:REASON ... (ids of this page)")
            return 0
        unknown = sorted(set(rejected) - set(page["ids"]))  # checked here, before the paused build sees them
        if unknown:
            raise InputError(f"rejected ids {unknown} are not on the page under review (shard {page['shard']:05d} "
                             f"page {page['page'] + 1}); run pointvl review {args.target} to list its ids")
    elif not args.approve_all and not rejected:
        raise InputError("give --approve-all or at least one --reject ID:REASON")
    from prefect.exceptions import FlowPauseTimeout
    from prefect.flow_runs import NotPausedError, resume_flow_run

    run_input = {
        "approve_rest": args.approve_all,  # --approve-all ends the review (this page and the rest), as it always did
        "rejected": [{"instance_id": i, "reason": r} for i, r in rejected.items()],
        "reviewer": args.reviewer,
        "source": "cli",
    }
    try:
        resume_flow_run(run_id, run_input=run_input)
    except (NotPausedError, FlowPauseTimeout) as err:
        raise InputError(f"flow run {run_id} is not waiting for review: {err}") from err
    print(f"answered the review of flow run {run_id}: "
          f"{'approve all' if args.approve_all else f'{len(rejected)} rejected'} (reviewer {args.reviewer})")
    return 0


def _review_held(args: argparse.Namespace, rejected: dict[str, str]) -> int:
    """No build is waiting: answer for the items a timeout policy held back, after the fact."""
    from pointvl.dataset.plan import load_plan
    from pointvl.dataset.stages.review import decide_held, held_items

    if not io.exists(RunFolder.of(args.target).plan):
        raise InputError(f"{args.target} is neither a build folder nor a flow run id")
    shards = [s.index for s in load_plan(args.target).shards]
    held = held_items(args.target, shards)
    if not held:
        raise InputError(f"{args.target} has no build waiting for review and no items held for review")
    if not args.approve_all and not rejected:
        for shard, ids in held.items():
            print(f"shard {shard:05d}: held " + ", ".join(ids))
        print(f"answer with: pointvl review {args.target} --approve-all | --reject ID:REASON ...")
        return 0
    try:
        counts = decide_held(args.target, shards, args.approve_all, rejected, args.reviewer)
    except ValueError as err:
        raise InputError(str(err)) from err
    print(f"held items: {counts['approved']} approved, {counts['rejected']} rejected; "
          f"`pointvl resume {args.target}` writes them into the shards")
    return 0


def _local_parameters(run_dir: str) -> dict[str, Any]:
    path = RunFolder.of(run_dir).config
    if not io.exists(path):
        raise InputError(f"{run_dir} is not a run folder with a plan (no config.json): use `pointvl build`")
    config = io.read_json(path)
    shapenet = config.pop("shapenet")
    return {"shapenet": shapenet, "out": run_dir, "config": config}


def _deployed_origin(target: str) -> tuple[uuid.UUID, uuid.UUID] | None:
    """(flow run, deployment) of the build to resume, when it ran from a deployment; None for a local one."""
    run_id = _flow_run_id(target)
    if run_id is None:
        from pointvl.tasks.build_lock import api_url

        if not io.exists(RunFolder.of(target).last_build):
            return None
        origin = io.read_json(RunFolder.of(target).last_build)
        if not origin.get("deployment_id"):
            return None
        if origin["api_url"] != api_url():
            raise InputError(f"{target} was built by deployment {origin['deployment']} of the Prefect API at "
                             f"{origin['api_url']}; set PREFECT_API_URL={origin['api_url']} to resume it there")
        run_id = uuid.UUID(origin["flow_run_id"])
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        run = client.read_flow_run(run_id)
    if run.deployment_id is None:
        raise InputError(f"flow run {run_id} did not run from a deployment: resume its run folder "
                         f"{run.parameters.get('out')} instead")
    return run_id, run.deployment_id


def _resume(args: argparse.Namespace) -> int:
    """A deployed build resumes as a new run of its deployment (on the workers, review gate as deployed);
    a local one resumes in this process."""
    from pointvl.tasks.build_lock import check_unlocked

    origin = _deployed_origin(args.target)
    if origin is None:
        from prefect.exceptions import CancelledRun

        from pointvl.core.interrupt import on_interrupt, start_reaper
        from pointvl.dataset.summary import format_summary
        from pointvl.flows.build import build_benchmark

        params = _local_parameters(args.target)
        on_interrupt("resume", f"run `pointvl resume {args.target}` again")
        start_reaper()
        check_unlocked(args.target)
        try:
            summary = build_benchmark(**params)
        except CancelledRun as err:  # another build holds the folder: one line, exit 2
            raise InputError(str(err)) from None
        print(format_summary(summary))
        print(f"resumed {args.target} locally: {summary['records']} records; finished work was reused")
        return 0
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment

    with get_client(sync_client=True) as client:
        old = client.read_flow_run(origin[0])
        deployment = client.read_deployment(origin[1])
    check_unlocked(old.parameters["out"])
    run = run_deployment(name=origin[1], parameters=old.parameters, timeout=0, as_subflow=False,
                         flow_run_name=f"resume-{old.name}", tags=["resume"])
    print(f"resumed {old.parameters['out']} as flow run {run.id} of deployment {deployment.name} on its workers "
          f"(from {old.name}, {old.state.name if old.state else 'unknown'}); finished work is reused")
    return 0


def _preview(args: argparse.Namespace) -> int:
    from pointvl.dataset.preview import PreviewServer

    with PreviewServer(RunFolder.of(os.path.abspath(args.run_dir)).previews, args.host, args.port) as server:
        print(f"serving {RunFolder.of(args.run_dir).previews} at {server.url} (Ctrl-C stops)")
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            return 0


def add_ops_commands(commands: Any) -> None:
    """Add ``review``, ``resume`` and ``preview`` to the ``pointvl`` subcommands."""
    review = commands.add_parser("review", help="answer the review form of a build paused for review")
    review.add_argument("target", metavar="RUN_DIR|FLOW_RUN_ID", help="the run folder, or the paused flow run's id")
    review.add_argument("--approve-all", action="store_true", help="approve every item under review")
    review.add_argument("--reject", action="append", default=[], metavar="ID:REASON",
                        help="leave instance ID out of the shards, with REASON (repeat for more)")
    review.add_argument("--reviewer", default=getpass.getuser(), help="your name for the log (default: $USER)")
    review.set_defaults(command_handler=_review)

    resume = commands.add_parser(
        "resume", help="re-run a failed build with its input and config, reusing everything finished"
    )
    resume.add_argument("target", metavar="RUN_DIR|FLOW_RUN_ID", help="the run folder, or the failed flow run's id")
    resume.set_defaults(command_handler=_resume)

    preview = commands.add_parser("preview", help="serve RUN_DIR/previews (the contact sheets) over HTTP")
    preview.add_argument("run_dir", metavar="RUN_DIR")
    preview.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback)")
    preview.add_argument("--port", type=int, default=8765, help="port (default 8765, 0 = any free one)")
    preview.set_defaults(command_handler=_preview)
