"""The training flow on finished shards, read as the DAG (``docs/design.md#grca``, paper §3.2-3.5, Table 3):

    sft ─► (sft_budget_matched | grpo_<mode>) ─► evaluate (predict + metrics) ─► training curves ─► report

Each stage writes a checkpoint in the run folder and is skipped when it exists, so a re-run resumes
at the first unfinished stage (a stage itself resumes from its last checkpoint). ``preset`` picks the
paper's setup or the tiny CPU one; ``config`` overrides any field, nested as in ``TrainConfig`` or by
dotted path (``{"sft.max_steps": 6}``), the same overrides ``pointvl train --config/--set`` takes.
"""

from __future__ import annotations

from prefect import flow, get_run_logger

from pointvl.tasks.artifacts import publish_report
from pointvl.tasks.run_logs import send_library_logs
from pointvl.tasks.training import evaluate, report_to_build, shards_build_id, train_stage, training_curves
from pointvl.train.pipeline import check_config, stage_names
from pointvl.train.train_config import preset_config
from pointvl.train.variants import PRESET_NAMES


@flow(name="train-pointvl", description="SFT warm-up → routed GRPO (GRCA + RPC) → evaluation on shards",
      on_failure=[report_to_build], on_crashed=[report_to_build])
def train(shards: str, run_dir: str, preset: str = "paper", variant: str = "grca_rpc",
          config: dict | None = None, build_id: str = "", build_flow_run_id: str = "") -> dict:
    """Train one Table 3 variant on ``shards`` into ``run_dir`` and return its test metrics.

    ``build_id`` and ``build_flow_run_id`` name the benchmark build the shards came from (set by the
    build's hand-off); a failure is reported on that build's run. Artifact keys end in the build id
    (:func:`pointvl.tasks.training.shards_build_id` when none is given); ``train-progress-…`` follows the steps.
    """
    send_library_logs()
    bid = build_id or shards_build_id(shards)  # every artifact key ends in it
    if build_id:
        get_run_logger().info("training on build %s (%s)", build_id, shards)
    cfg = preset_config(preset, variant, config)
    check_config(run_dir, cfg)
    stages = stage_names(cfg)
    checkpoint = None
    for stage in stages:
        checkpoint = train_stage(cfg, shards, run_dir, stage, checkpoint, bid)
    metrics = evaluate(cfg, shards, run_dir, checkpoint, variant, bid)
    training_curves(run_dir, stages, bid)
    publish_report(shards, run_dir, variant, bid)
    return metrics


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Run the training flow (embedded Prefect).")
    parser.add_argument("--shards", required=True)
    parser.add_argument("--run", required=True)
    parser.add_argument("--preset", default="paper", choices=PRESET_NAMES)
    parser.add_argument("--variant", default="grca_rpc")
    parser.add_argument("--config", help="a TrainConfig YAML/JSON (overrides the preset)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="dotted override (repeatable)")
    args = parser.parse_args()
    from pointvl.evaluation.scoring import format_table
    from pointvl.train.train_config import command_line_overrides

    metrics = train(args.shards, args.run, preset=args.preset, variant=args.variant,
                    config=command_line_overrides(args.config, args.set))
    print(format_table(metrics, name=args.variant))
