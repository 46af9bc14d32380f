"""The training flow's stages on a run folder: SFT, (budget-matched SFT | routed GRPO), predict + evaluate.

Run folder (every file written atomically; a stage is finished when its ``history.json`` exists)::

    RUN/config.json                      the TrainConfig (a re-run must match it)
    RUN/<stage>/checkpoint-<step>/       Hugging Face Trainer layout (pointvl.train.checkpoint), every
                                         save_steps and at the end; the last one is the stage's policy
    RUN/<stage>/history.json             one row per optimizer step (written last)
    RUN/compute.json                     per stage: optimizer steps, samples, tokens, seconds, processes
    RUN/eval/predictions.jsonl, RUN/eval/metrics.json
    RUN/curves.png                       training curves of all stages

A stage starts from the previous stage's last checkpoint; an interrupted stage resumes from its own
last checkpoint, so a killed run loses at most ``save_steps`` steps. Stage names: ``sft``,
``sft_budget_matched``, ``grpo_<mode>``. Under ``accelerate launch`` every rank runs the pipeline; rank 0
writes the run's files.

**SFT (budget-matched)** (Table 3) continues SFT from the SFT checkpoint for as many training samples
as the GRPO stage trains on: G completions per prompt, :func:`pointvl.train.grpo.trained_samples`.
Samples, not tokens or steps: each GRPO completion is one forward and backward pass over a prompt and
an answer of about the target's length, so matching samples matches the update compute (generation
is the RL stage's extra cost, logged apart); steps would differ by the batch sizes (128 prompts vs G x
prompts_per_step completions). Its schedule continues SFT's: a constant rate equal to where SFT's
cosine ended (``learning_rate x min_lr_ratio``), no new warm-up.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from typing import Any

import torch

from pointvl.core import io as pio
from pointvl.core.errors import InputError
from pointvl.evaluation.report import plot_curves
from pointvl.evaluation.scoring import EvaluateConfig
from pointvl.evaluation.scoring import run as run_evaluate
from pointvl.train import checkpoint as ckpt
from pointvl.train.data import ShardExamples
from pointvl.train.grpo import run_grpo, trained_samples
from pointvl.train.model import build_image_processor, build_model, build_tokenizer
from pointvl.train.predict import predict
from pointvl.train.sft import run_sft
from pointvl.train.stage_setup import StepCallback, distributed_state, num_processes, whole_parameters
from pointvl.train.train_config import SFTConfig, TrainConfig, preflight

logger = logging.getLogger(__name__)


def is_main_process() -> bool:
    return distributed_state().is_main_process


def check_config(run_dir: str, config: TrainConfig) -> None:
    """Check the job can start (:func:`preflight`); write ``RUN/config.json`` once; InputError if the folder
    holds a run with another config."""
    preflight(config)
    path = pio.join(run_dir, "config.json")
    current = json.loads(json.dumps(config.to_dict()))
    if pio.exists(path):
        if pio.read_json(path) != current:
            raise InputError(f"{run_dir} holds a run with another config; use a new run folder")
        return
    if is_main_process():
        pio.write_json(path, current)


def load(config: TrainConfig, checkpoint: str | None) -> tuple[Any, Any, Any]:
    """Tokenizer, image processor and policy (weights from a ``checkpoint-<step>`` folder when given)."""
    torch.manual_seed(config.sft.seed)
    with whole_parameters():  # not under zero.Init after a DeepSpeed stage (its docstring)
        tokenizer = build_tokenizer(config.model)
        model = build_model(config.model, tokenizer)
        if checkpoint is not None:
            ckpt.load_weights(model, checkpoint)
    return tokenizer, build_image_processor(config.model), model


def budget_matched_sft(config: TrainConfig, num_prompts: int) -> SFTConfig:
    """The SFT config of the budget-matched baseline (module docstring): GRPO's trained samples, constant rate."""
    sft = config.sft
    return dataclasses.replace(sft, max_samples=trained_samples(num_prompts, config.grpo), max_steps=None,
                               schedule="constant", learning_rate=sft.learning_rate * sft.min_lr_ratio,
                               warmup_ratio=0.0)


def compute_row(stage: str, history: list[dict]) -> dict:
    """What a stage cost: optimizer steps, samples trained on, tokens, seconds, processes."""
    total = {k: sum(r.get(k, 0.0) for r in history) for k in ("tokens", "generated_tokens", "seconds",
                                                                   "seconds_generate")}
    return {"stage": stage, "optimizer_steps": len(history), "samples": history[-1]["samples"] if history else 0,
            "processes": num_processes(), **total}


def stage_names(config: TrainConfig) -> list[str]:
    """The training stages of the variant, in order."""
    if config.variant == "sft":
        return ["sft"]
    if config.variant == "sft_budget_matched":
        return ["sft", "sft_budget_matched"]
    return ["sft", f"grpo_{config.grpo.mode}"]


def format_compute(rows: list[dict]) -> str:
    """``RUN/compute.json`` rows as one markdown table (concatenate several runs' rows to compare variants)."""
    head = ["stage", "optimizer_steps", "samples", "tokens", "generated_tokens", "seconds", "processes"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in rows:
        cells = [f"{r[k]:.1f}" if k == "seconds" else f"{r[k]:.0f}" if isinstance(r[k], float) else str(r[k])
                 for k in head]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def train_stage(config: TrainConfig, shards_dir: str, run_dir: str, stage: str, init_from: str | None,
                on_step: StepCallback | None = None) -> str:
    """Run (or resume) one training stage unless finished; returns its last checkpoint folder. ``on_step(step,
    total, row)`` is called after each optimizer step with its ``history.json`` row (the flow publishes it)."""
    folder = pio.join(run_dir, stage)
    if pio.exists(pio.join(folder, "history.json")):
        logger.info("%s: finished, skipped", stage)
        return ckpt.latest_checkpoint(folder)
    tokenizer, images, model = load(config, init_from)
    if stage == "sft":
        history = run_sft(model, tokenizer, images, shards_dir, config.sft, folder, on_step)
    elif stage == "sft_budget_matched":
        n = len(ShardExamples(shards_dir, "train", config.model.num_points, config.model.quant, shuffle=False))
        history = run_sft(model, tokenizer, images, shards_dir, budget_matched_sft(config, n), folder, on_step)
    else:
        history = run_grpo(model, tokenizer, images, shards_dir, config.grpo, folder, on_step)
    if is_main_process():
        compute_path = pio.join(run_dir, "compute.json")
        rows = [r for r in (pio.read_json(compute_path) if pio.exists(compute_path) else []) if r["stage"] != stage]
        pio.write_json(compute_path, [*rows, compute_row(stage, history)])
        pio.write_json(pio.join(folder, "history.json"), history)
    return ckpt.latest_checkpoint(folder)


def evaluate_stage(config: TrainConfig, shards_dir: str, run_dir: str, checkpoint: str) -> dict:
    """Predict the test split with ``checkpoint`` and score it (skipped when ``metrics.json`` exists)."""
    folder = pio.join(run_dir, "eval")
    metrics_path = pio.join(folder, "metrics.json")
    if pio.exists(metrics_path):
        return pio.read_json(metrics_path)
    predictions = pio.join(folder, "predictions.jsonl")
    if not pio.exists(predictions):
        tokenizer, images, model = load(config, checkpoint)
        with whole_parameters():  # every rank decodes its prompts with the whole policy, no engine
            predict(model, tokenizer, images, shards_dir, predictions, max_new_tokens=config.eval_max_new_tokens,
                    batch_size=config.eval_batch_size)
    if not is_main_process():
        return {}
    grca = config.grpo.grca  # the verifier's options of the rewards, so that metric and reward agree
    return run_evaluate(shards_dir, predictions, metrics_path, EvaluateConfig(
        quant=config.model.quant, num_keypoints=grca.num_keypoints, keypoint_spread=grca.keypoint_spread))


def run_pipeline(config: TrainConfig, shards_dir: str, run_dir: str) -> dict:
    """All stages of the variant, evaluation and the curves, without an orchestrator (``pointvl train``)."""
    check_config(run_dir, config)
    stages = stage_names(config)
    checkpoint = None
    for stage in stages:
        checkpoint = train_stage(config, shards_dir, run_dir, stage, checkpoint)
    metrics = evaluate_stage(config, shards_dir, run_dir, checkpoint)
    if is_main_process():
        plot_curves(run_dir, stages)
    return metrics
