"""Operations commands of the ``pointvl`` CLI: ``review``, ``resume``, ``preview``.

- ``pointvl review RUN_DIR|FLOW_RUN_ID [--approve-all | --reject ID:REASON ...] [--reviewer NAME]``
  answers the review form of a build paused for review (the same form as the Prefect UI's); with
  no answer it lists the items waiting and the contact sheets.
- ``pointvl resume RUN_DIR|FLOW_RUN_ID`` re-runs a failed or stopped build with its original input
  and config: finished shards of every stage, and finished items of a GPU shard, are reused.
  A build that ran from a deployment (``RUN/reports/last_build.json`` says so) resumes as a new run of
  that deployment, on its workers and with its review gate; a local build resumes in this process.
- ``pointvl cancel-watch --pool POOL`` runs beside a worker (``make worker-*``) and ends the runs that stay
  Cancelling after a server outage (:mod:`pointvl.tasks.cancel_watch`).
- ``pointvl preview RUN_DIR`` serves ``RUN_DIR/previews`` (the contact sheets) until Ctrl-C, at the address the
  review's artifacts name (``RUN/reports/preview_server.json``), so they show again after the review.
- ``pointvl preflight [--deployments prefect.yaml | --preset P ...]`` checks, before ``prefect deploy``, that the
  training hand-off of every build deployment could start on this machine (``make deploy`` runs it).

Prefect is imported inside the commands that talk to the server, as in ``pointvl build``.
"""

from __future__ import annotations

import argparse
import getpass
import os
import re
import time
import uuid
from typing import TYPE_CHECKING, Any

from pointvl.core import io
from pointvl.core.errors import InputError
from pointvl.dataset.run_folder import RunFolder
from pointvl.train.variants import PRESET_NAMES

if TYPE_CHECKING:
    from pointvl.dataset.handoff import HandoffConfig


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
        out = client.read_flow_run(origin[0]).parameters["out"]
    check_unlocked(out)  # may mark the old run crashed: its state is read after this, not before
    with get_client(sync_client=True) as client:
        old = client.read_flow_run(origin[0])
        deployment = client.read_deployment(origin[1])
    run = run_deployment(name=origin[1], parameters=old.parameters, timeout=0, as_subflow=False,
                         flow_run_name=f"resume-{old.name}", tags=["resume"])
    print(f"resumed {old.parameters['out']} as flow run {run.id} of deployment {deployment.name} on its workers "
          f"(from {old.name}, {old.state.name if old.state else 'unknown'}); finished work is reused")
    return 0


def _cancel_watch(args: argparse.Namespace) -> int:
    import logging

    from pointvl.tasks.cancel_watch import watch

    logging.basicConfig(level=logging.INFO, format="%(asctime)s | %(levelname)s | %(name)s - %(message)s")
    watch(args.pool, args.interval_s, args.grace_s, args.kill_after_s)
    return 0


def _preview_address(run_dir: str, host: str | None, port: int | None) -> tuple[str, int, str]:
    """(host, port, base URL) to serve ``run_dir``'s previews at: what ``--host``/``--port`` say, else the address
    the review's artifacts name (the detached server's record, kept after it stops), else the run's
    ``review.preview_host``/``preview_port`` (or 127.0.0.1:8765)."""
    folder = RunFolder.of(run_dir)
    recorded = io.read_json(folder.preview_server) if io.exists(folder.preview_server) else {}
    config = io.read_json(folder.config).get("review", {}) if io.exists(folder.config) else {}
    host = host or recorded.get("host") or config.get("preview_host", "127.0.0.1")
    port = port if port is not None else recorded.get("port", config.get("preview_port", 8765))
    same = (host, port) == (recorded.get("host"), recorded.get("port"))
    return host, port, recorded.get("url", "") if same else ""


def _preview(args: argparse.Namespace) -> int:
    from pointvl.dataset.preview import PreviewServer, detached_url

    run_dir = os.path.abspath(args.run_dir)
    folder = RunFolder.of(run_dir)
    if (url := detached_url(folder.preview_server)) is not None:
        print(f"{folder.previews} is already served at {url} (the review's preview server)")
        return 0
    host, port, base_url = _preview_address(run_dir, args.host, args.port)
    # exact=True: a port in use is an error here, since a free one would not be the URL the artifacts name
    try:
        server = PreviewServer(folder.previews, host, port, base_url, exact=True).start()
    except OSError as err:
        named = ", the address the review's artifacts name" if args.port is None else ""
        raise InputError(f"cannot serve on {host}:{port}{named} ({err.strerror}): stop what uses it, or give "
                         "--port (the artifacts' links will not follow)") from None
    try:
        print(f"serving {folder.previews} at {server.url} (Ctrl-C stops)", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        return 0
    finally:
        server.stop()


_TEMPLATE = re.compile(r"\{\{\s*\$(\w+)\s*\}\}")


def _deployed_handoffs(path: str) -> dict[str, HandoffConfig]:
    """Each build deployment's hand-off in ``path`` (a prefect.yaml) as ``prefect deploy`` would create it: the
    ``{{ $VAR }}`` templates filled from the environment, ``handoff`` and ``overrides`` merged as the flow does."""
    from pointvl.dataset.build_config import BuildConfig

    def fill(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: fill(v) for k, v in value.items()}
        if isinstance(value, list):
            return [fill(v) for v in value]
        if not isinstance(value, str):
            return value
        for name in _TEMPLATE.findall(value):
            if name not in os.environ:
                raise InputError(f"{path} needs ${name} in the environment (make deploy sets it)")
        return _TEMPLATE.sub(lambda m: os.environ[m.group(1)], value)

    data = fill(io.read_yaml(path, "deployment file"))
    handoffs = {}
    for deployment in data.get("deployments") or []:
        params = deployment.get("parameters") or {}
        if deployment.get("entrypoint", "").endswith(":build_benchmark") and "handoff" in params:
            try:
                config = BuildConfig.from_parameters(params.get("config"), params.get("overrides"), params["handoff"])
            except ValueError as err:
                raise InputError(f"{path}: deployment {deployment['name']}: {err}") from None
            handoffs[deployment["name"]] = config.handoff
    return handoffs


def _preflight(args: argparse.Namespace) -> int:
    """Refuse (one line naming the fix) a deployment whose build could never hand off to training here."""
    from pointvl.dataset.handoff import HandoffConfig
    from pointvl.train.train_config import parse_overrides, preflight, preset_config

    if args.deployments:
        handoffs = _deployed_handoffs(args.deployments)
        fix = (f"put the weights on this machine (handoff.overrides in {args.deployments}), deploy with "
               f"POINTVL_TRAIN_PRESET=tiny, or set handoff.train: false in {args.deployments}")
    else:
        handoffs = {"--preset": HandoffConfig(train=True, preset=args.preset, variant=args.variant,
                                              overrides=parse_overrides(args.set))}
        fix = "put the weights on this machine, give them with --set, or use --preset tiny"
    checked = []
    for name, handoff in handoffs.items():
        if not handoff.train:
            continue
        try:
            preflight(preset_config(handoff.preset, handoff.variant, handoff.overrides))
        except (TypeError, ValueError) as err:  # InputError and ConfigError are ValueErrors
            raise InputError(f"the training hand-off of {name} (preset {handoff.preset!r}) cannot start on this "
                             f"machine: {err}. Fix: {fix}") from None
        checked.append(f"{name} ({handoff.preset}, {handoff.variant})")
    print(f"training hand-off can start here: {', '.join(checked)}" if checked else "no training hand-off to check")
    return 0


def add_ops_commands(commands: Any) -> None:
    """Add ``review``, ``resume``, ``preview``, ``preflight`` and ``cancel-watch`` to the ``pointvl`` subcommands."""
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
    preview.add_argument("--host", help="address to bind (default: the one the review's artifacts name, else "
                         "review.preview_host)")
    preview.add_argument("--port", type=int, help="port (default: the one the review's artifacts name, else "
                         "review.preview_port; 0 = any free one)")
    preview.set_defaults(command_handler=_preview)

    watch = commands.add_parser(
        "cancel-watch", help="beside a worker: end its pool's runs that stay Cancelling after a server outage")
    watch.add_argument("--pool", required=True, help="the work pool of the worker this watch runs beside")
    watch.add_argument("--interval-s", type=float, default=10, help="seconds between two passes (default 10)")
    watch.add_argument("--grace-s", type=float, default=30,
                       help="how long a run may stay Cancelling before the watch acts (default 30)")
    watch.add_argument("--kill-after-s", type=float, default=30,
                       help="SIGKILL a run's processes this long after SIGTERM (default 30)")
    watch.set_defaults(command_handler=_cancel_watch)
    preflight = commands.add_parser(
        "preflight", help="check that the training hand-off could start here (make deploy runs it before deploying)")
    preflight.add_argument("--deployments", metavar="PREFECT_YAML",
                           help="check every build deployment's handoff in this prefect.yaml, its {{ $VAR }} "
                                "from the environment (as prefect deploy fills them)")
    preflight.add_argument("--preset", choices=PRESET_NAMES, default="paper", help="without --deployments: the preset")
    preflight.add_argument("--variant", default="grca_rpc", help="without --deployments: the Table 3 variant")
    preflight.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                           help="without --deployments: a TrainConfig override by dotted path (repeatable)")
    preflight.set_defaults(command_handler=_preflight)
