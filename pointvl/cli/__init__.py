"""The ``pointvl`` command line: ``pointvl <command> ...`` (see ``pointvl --help``).

The application around the library: ``build``, ``review`` and ``resume`` start or answer Prefect flows
and import Prefect inside those commands only, so importing the library never imports it."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time

from pointvl.cli.evaluation import add_eval_commands, add_predict_sources, predict_from_source
from pointvl.cli.operations import add_ops_commands
from pointvl.core.errors import InputError
from pointvl.dataset.run_folder import RunFolder
from pointvl.fixture import write_fixture
from pointvl.train.variants import PRESET_NAMES, VARIANTS

RANK_EXIT_DELAY_S = 30.0
"""Under a launch, how long a rank other than 0 waits before exiting on a refusal (rank 0 prints it)."""


def _fixture(args: argparse.Namespace) -> int:
    manifest = write_fixture(args.out_dir, seed=args.seed, catalogue=args.catalogue)
    n_models = sum(len(ids) for ids in manifest.models.values())
    print(
        f"wrote a mini ShapeNetCore v2 to {args.out_dir}: {len(manifest.models)} synsets, "
        f"{n_models} model folders, {len(manifest.faults)} deliberately faulty"
    )
    return 0


def _build(args: argparse.Namespace) -> int:
    from pointvl.core import io
    from pointvl.dataset.build_config import BuildConfig
    from pointvl.dataset.clean import Clean
    from pointvl.dataset.executor import check_placement
    from pointvl.dataset.plan import fingerprint, load_plan
    from pointvl.dataset.shapenet import read_taxonomy
    from pointvl.dataset.summary import format_summary

    # 1. Check everything cheap before Prefect starts (seconds) and before any GPU or API work.
    config = BuildConfig.from_file(args.config) if args.config else BuildConfig()
    config.annotate.redo_failed |= args.redo_failed
    read_taxonomy(args.shapenet)
    Clean(config.clean).resolve_categories(read_taxonomy(args.shapenet))
    shapenet, out = (p if io.is_url(p) else os.path.abspath(p) for p in (args.shapenet, args.out))
    check_placement(args.workers, args.dask_scheduler, shapenet, out)
    if io.exists(out) and not io.filesystem(out)[0].isdir(io.filesystem(out)[1]):
        raise InputError(f"--out {args.out} is a file; give a folder for the build")
    if not args.incremental and io.exists(RunFolder.of(out).plan) and (
        load_plan(out).fingerprint != fingerprint(shapenet, config.output_dict())
    ):
        raise InputError(
            f"{out} holds a build of another input or config; use a new --out folder, the original "
            "--shapenet and --config to resume it, or --incremental to update it"
        )
    # 2. Run the flow: embedded Prefect unless PREFECT_API_URL points at a server; one build per folder.
    from prefect.exceptions import CancelledRun

    from pointvl.core.interrupt import on_interrupt, start_reaper
    from pointvl.flows.build import build_benchmark
    from pointvl.tasks.build_lock import check_unlocked

    on_interrupt("build", "re-run the same command")
    start_reaper()
    try:
        check_unlocked(out)
        summary = build_benchmark(shapenet=shapenet, out=out, config=config.to_dict(), incremental=args.incremental,
                                  workers=args.workers, dask_scheduler=args.dask_scheduler)
    except InputError:
        raise
    except CancelledRun as err:  # another build holds the folder (it took it after check_unlocked): exit 2
        raise InputError(str(err)) from None
    except Exception as err:  # a fault of the run (storage, orchestrator, a stage bug): one line, exit 1
        print(f"pointvl build: failed: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''} "
              f"(the run's log above has the details; re-run the same command to resume)", file=sys.stderr)
        return 1
    print(format_summary(summary))
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from pointvl.evaluation.scoring import EvaluateConfig, format_table, run

    config = EvaluateConfig(split=args.split, per_category=args.per_category, bertscore_model=args.bertscore_model,
                            num_keypoints=args.num_keypoints or None, keypoint_spread=args.keypoint_spread)
    metrics = run(args.shards, args.predictions, args.out, config)
    print(format_table(metrics, name=args.name))
    return 0


def _train_config(args: argparse.Namespace, variant: str):
    """The TrainConfig of ``--preset`` with ``--config FILE`` then every ``--set KEY=VALUE`` merged in."""
    from pointvl.train.train_config import command_line_overrides, preset_config

    return preset_config(args.preset, variant, command_line_overrides(args.config, args.set or []))


def _predict(args: argparse.Namespace) -> int:
    if args.endpoint or args.reference:
        return predict_from_source(args)
    from pointvl.core import io as pio
    from pointvl.core.record import list_shards
    from pointvl.train.checkpoint import latest_checkpoint, load_policy
    from pointvl.train.model import build_image_processor
    from pointvl.train.pipeline import load
    from pointvl.train.predict import predict
    from pointvl.train.train_config import check_weights

    list_shards(args.shards, args.split)  # before any model is built
    cfg = _train_config(args, "sft")
    if args.checkpoint:  # a checkpoint-<step> folder, or a stage folder (its last checkpoint)
        folder = args.checkpoint if pio.exists(pio.join(args.checkpoint, "model.safetensors")) else (
            latest_checkpoint(args.checkpoint))
        if folder is None:
            raise InputError(f"--checkpoint {args.checkpoint} holds no checkpoint-<step>/model.safetensors")
        tokenizer, model = load_policy(folder)
        images = build_image_processor(model.config)
    else:
        check_weights(cfg)
        tokenizer, images, model = load(cfg, None)
    n = predict(model, tokenizer, images, args.shards, args.out, split=args.split,
                max_new_tokens=cfg.eval_max_new_tokens, batch_size=cfg.eval_batch_size)
    print(f"wrote {n} predictions to {args.out}")
    return 0


def _train(args: argparse.Namespace) -> int:
    from pointvl.core.record import list_shards
    from pointvl.evaluation.scoring import format_table
    from pointvl.train.pipeline import run_pipeline
    from pointvl.train.train_config import preflight

    list_shards(args.shards, "train")  # before any model is built
    config = _train_config(args, args.variant)
    preflight(config)
    metrics = run_pipeline(config, args.shards, args.run)
    if metrics:  # rank 0 of a multi-process launch
        from pointvl.core import io as pio
        from pointvl.train.pipeline import format_compute

        print(format_table(metrics, name=config.variant))
        print(format_compute(pio.read_json(pio.join(args.run, "compute.json"))))
    return 0


def _add_train_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", choices=PRESET_NAMES, default="paper")
    parser.add_argument("--config", help="a TrainConfig YAML/JSON (a run's config.json, or some of its fields)")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE",
                        help="override one TrainConfig field by its dotted path, e.g. sft.max_steps=6 or "
                             "model.point_bert.checkpoint=/w/point_bert_v1.2.pt (repeatable; after --config)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pointvl", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    fixture = commands.add_parser(
        "fixture", help="write a mini ShapeNetCore v2 (procedural meshes, real ShapeNet faults) to OUT_DIR"
    )
    fixture.add_argument("out_dir", metavar="OUT_DIR", help="a new or empty folder (path or fsspec URL)")
    fixture.add_argument("--seed", type=int, default=0, help="every random choice follows it (default 0)")
    fixture.add_argument("--catalogue", action="store_true",
                         help="add the fault catalogue: real-world OBJ files (other units, UTF-16, quads), more faults")
    fixture.set_defaults(command_handler=_fixture)

    build = commands.add_parser(
        "build", help="build (or resume) the benchmark from a ShapeNetCore v2 folder, as a Prefect flow"
    )
    build.add_argument("--shapenet", required=True,
                       help="the ShapeNetCore v2 folder (holds taxonomy.json): a path or fsspec URL (s3://...)")
    build.add_argument("--out", required=True, help="the run folder (path or fsspec URL); re-run to resume")
    build.add_argument("--config", help="YAML/JSON config, one section per component (default: the paper's)")
    build.add_argument(
        "--incremental", action="store_true",
        help="update --out to new or changed models and a changed config: only affected shards and stages are "
             "recomputed; replaced outputs move to OUT/superseded/",
    )
    build.add_argument("--redo-failed", action="store_true",
                       help="annotate again the items whose annotation failed (cached replies cost nothing)")
    where = build.add_mutually_exclusive_group()
    where.add_argument("--workers", type=int, metavar="N",
                       help="CPU stages in N worker processes (default: this machine's cores; 0: in this process)")
    where.add_argument("--dask-scheduler", metavar="tcp://HOST:PORT",
                       help="run the CPU stages on the workers of this running Dask scheduler instead")
    build.set_defaults(command_handler=_build)

    evaluate = commands.add_parser(
        "evaluate", help="score a predictions JSONL on the test split (IoU, KPA, RPC, QA, BLEU, ROUGE, BERTScore)"
    )
    evaluate.add_argument("--shards", required=True, help="the folder of {split}-*-of-*.parquet shards")
    evaluate.add_argument(
        "--predictions", required=True, help='JSONL, one {"instance_id": ..., "output": ...} per line'
    )
    evaluate.add_argument("--out", required=True, help="where to write the metrics JSON")
    evaluate.add_argument("--split", default="test", help="the split to score (default test)")
    evaluate.add_argument("--name", default="model", help="the row label in the printed table")
    evaluate.add_argument("--per-category", action="store_true", help="also break every metric down by category")
    evaluate.add_argument("--bertscore-model", default="roberta-large",
                          help="BERTScore's model: a local folder or a cached Hugging Face id (never downloaded)")
    evaluate.add_argument("--num-keypoints", type=int, default=16,
                          help="keypoints a kpts field must hold to be scored (default 16, the paper's; 0: any count)")
    evaluate.add_argument("--keypoint-spread", type=float, default=0.0,
                          help="the keypoint-spread guard, in [0, 1] (default 0: off, the paper's KPA)")
    evaluate.set_defaults(command_handler=_evaluate)

    predict = commands.add_parser(
        "predict", help="write a predictions JSONL: a checkpoint (greedy), a served VLM or a reference predictor")
    predict.add_argument("--shards", required=True, help="the folder of {split}-*-of-*.parquet shards")
    predict.add_argument("--checkpoint", help="a checkpoint-<step> folder or a stage folder (its last checkpoint); "
                         "the policy is rebuilt from it (omit: the config's untrained policy)")
    _add_train_config_args(predict)
    predict.add_argument("--split", default="test")
    predict.add_argument("--out", required=True, help="the JSONL to write")
    add_predict_sources(predict)
    predict.set_defaults(command_handler=_predict)

    train = commands.add_parser("train", help="SFT -> routed GRPO -> evaluate into a run folder (resumes)")
    train.add_argument("--shards", required=True, help="the folder of {split}-*-of-*.parquet shards")
    train.add_argument("--run", required=True, help="the run folder (checkpoints, metrics, curves)")
    _add_train_config_args(train)
    train.add_argument(
        "--variant", default="grca_rpc",
        choices=VARIANTS, help="the Table 3 row",
    )
    train.set_defaults(command_handler=_train)
    add_ops_commands(commands)
    add_eval_commands(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per Prefect API call otherwise
    # Library log lines show in Prefect's run logs; nothing is sent home from an offline machine.
    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "pointvl")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # A busy machine starts the embedded server slower than Prefect's 20 s default allows.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    try:
        return args.command_handler(args)
    except InputError as err:  # input and config errors: one line, no traceback; once under a launch (rank 0)
        if os.environ.get("RANK", "0") == "0":
            print(f"pointvl {args.command}: error: {err}", file=sys.stderr, flush=True)
        else:
            # torch's elastic agent SIGTERMs every rank once one exits: the other ranks leave rank 0 the
            # time to print the line (the agent ends them when rank 0 exits; the sleep is only a bound)
            time.sleep(RANK_EXIT_DELAY_S)
        return 2
    except Exception as err:
        hint = orchestrator_hint(err)
        if hint is None:
            raise
        print(f"pointvl {args.command}: error: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
              f" ({hint})", file=sys.stderr)
        return 1


def orchestrator_hint(err: Exception) -> str | None:
    """What to do about an error of Prefect or of the connection to it; None for any other error."""
    tb = err.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    raised_in = tb.tb_frame.f_globals.get("__name__", "") if tb is not None else ""
    module = type(err).__module__ if type(err).__module__ != "builtins" else raised_in
    if module.startswith(("httpx", "httpcore")):
        return f"the Prefect API at {os.environ.get('PREFECT_API_URL') or 'the embedded server'} is unreachable: " \
            "start it (`make server`) or unset PREFECT_API_URL to run embedded"
    if module.startswith("prefect"):
        return "an error of the Prefect orchestrator; the run folder is intact: `pointvl resume RUN_DIR` goes on " \
            "where it stopped"
    return None


if __name__ == "__main__":
    raise SystemExit(main())
