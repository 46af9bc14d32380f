"""The evaluation side of the command line: ``predict --endpoint/--reference`` and ``report``."""

from __future__ import annotations

import argparse


def add_predict_sources(predict: argparse.ArgumentParser) -> None:
    """``pointvl predict`` from a served VLM or a reference predictor instead of a checkpoint."""
    src = predict.add_argument_group("a served VLM or a reference predictor instead of --checkpoint")
    src.add_argument("--endpoint", help="an OpenAI-compatible /v1 URL (vLLM, SGLang, OpenAI); key from --api-key-env")
    src.add_argument("--model", help="the served model's name (with --endpoint)")
    src.add_argument("--coords", choices=["bins", "norm1000", "qwen2.5-vl"], default="bins",
                     help="how the model writes coordinates: the benchmark's bins (default), 0-1000 relative "
                          "(Qwen3-VL, InternVL) or pixels of Qwen2.5-VL's resized image")
    src.add_argument("--api-key-env", default="OPENAI_API_KEY", help="variable holding the key (unset: none sent)")
    src.add_argument("--concurrency", type=int, default=8, help="requests in flight (default 8)")
    src.add_argument("--requests-per-minute", type=float, default=0.0, help="request spacing (default 0: none)")
    src.add_argument("--max-tokens", type=int, default=1024, help="reply budget per request (default 1024)")
    src.add_argument("--temperature", default="0", help="sampling temperature (default 0; 'none' sends none)")
    src.add_argument("--cache", help="the request cache folder (default OUT.cache)")
    src.add_argument("--reference", choices=["ground-truth", "mean-box"],
                     help="a predictor that needs no model: the targets, or the train split's per-category means")


def predict_from_source(args: argparse.Namespace) -> int:
    """``predict --endpoint`` or ``predict --reference``; the caller checked that one is given."""
    from pointvl.core.errors import InputError

    if args.endpoint and args.reference or (args.endpoint or args.reference) and args.checkpoint:
        raise InputError("give one of --checkpoint, --endpoint or --reference")
    if args.reference:
        from pointvl.evaluation.predict_reference import write_reference

        n = write_reference(args.reference, args.shards, args.out, split=args.split)
        print(f"wrote {n} {args.reference} predictions to {args.out}")
        return 0
    from pointvl.evaluation.predict_endpoint import EndpointConfig, predict_endpoint

    if not args.model:
        raise InputError("--endpoint needs --model NAME (the served model's name)")
    try:
        temperature = None if args.temperature.lower() == "none" else float(args.temperature)
    except ValueError:
        raise InputError(f"--temperature must be a number or 'none', got {args.temperature!r}") from None
    cfg = EndpointConfig(base_url=args.endpoint, model=args.model, coords=args.coords, api_key_env=args.api_key_env,
                         concurrency=args.concurrency, requests_per_minute=args.requests_per_minute,
                         max_tokens=args.max_tokens, temperature=temperature, cache_dir=args.cache)
    counts = predict_endpoint(args.shards, args.out, cfg, split=args.split)
    print(f"wrote {counts['n']} predictions of {args.model} to {args.out}: {counts['api_calls']} requests sent, "
          f"{counts['cache_hits']} from the cache, {counts['failed']} without a reply")
    return 0


def _report(args: argparse.Namespace) -> int:
    from pointvl.evaluation.report import parse_runs, report
    from pointvl.evaluation.scoring import EvaluateConfig

    runs = parse_runs(args.run)
    print(report(args.shards, args.out, runs, train_run=args.train_run, config=EvaluateConfig(split=args.split),
                 allow_unmatched=args.allow_unmatched))
    return 0


def add_eval_commands(commands: argparse._SubParsersAction) -> None:
    rep = commands.add_parser("report", help="the paper's tables and plots for one or more prediction files")
    rep.add_argument("--shards", required=True, help="the folder of {split}-*-of-*.parquet shards")
    rep.add_argument("--out", required=True, help="the folder for report.md, the PNG plots and one JSON a run")
    rep.add_argument("--run", action="append", default=[], metavar="NAME=PREDICTIONS.jsonl",
                     help="a run to report (repeat for several models or Table 3 variants)")
    rep.add_argument("--train-run", help="a `pointvl train --run` folder: adds its loss and reward curves")
    rep.add_argument("--split", default="test", help="the split to score (default test)")
    rep.add_argument("--allow-unmatched", action="store_true",
                     help="put runs side by side although their compute.json training budgets differ by over 5%%")
    rep.set_defaults(command_handler=_report)
