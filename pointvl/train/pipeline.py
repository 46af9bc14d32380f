"""The training flow's stages on a run folder: SFT, (budget-matched SFT | routed GRPO), predict + evaluate.

Run folder (every file written atomically; a stage is finished when its ``model.pt`` exists)::

    RUN/config.json                      the TrainConfig (a re-run must match it)
    RUN/<stage>/history.json             one row per optimizer step
    RUN/<stage>/model.pt                 the policy after the stage (written last)
    RUN/eval/predictions.jsonl, RUN/eval/metrics.json
    RUN/curves.png                       training curves of all stages

A stage starts from the previous stage's ``model.pt``, so an interrupted run resumes at the first
unfinished stage. Stage names: ``sft``, ``sft_budget_matched``, ``grpo_<mode>``.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import torch

from pointvl import io as pio
from pointvl.errors import InputError
from pointvl.evaluate import EvaluateConfig
from pointvl.evaluate import run as run_evaluate
from pointvl.train.config import TrainConfig
from pointvl.train.data import ShardExamples
from pointvl.train.grpo import run_grpo, total_steps
from pointvl.train.model import build_image_processor, build_model, build_tokenizer, load_policy, save_policy
from pointvl.train.predict import predict
from pointvl.train.sft import run_sft

logger = logging.getLogger(__name__)


def check_config(run_dir: str, config: TrainConfig) -> None:
    """Write ``RUN/config.json`` once; ValueError if the folder holds a run with another config."""
    path = pio.join(run_dir, "config.json")
    current = json.loads(json.dumps(config.to_dict()))
    if pio.exists(path):
        if pio.read_json(path) != current:
            raise InputError(f"{run_dir} holds a run with another config; use a new run folder")
        return
    pio.write_json(path, current)


def load(config: TrainConfig, checkpoint: str | None) -> tuple[Any, Any, Any]:
    """Tokenizer, image processor and policy (from ``checkpoint``'s ``model.pt`` when given)."""
    torch.manual_seed(config.sft.seed)
    tokenizer = build_tokenizer(config.model)
    model = build_model(config.model, tokenizer)
    if checkpoint is not None:
        load_policy(model, checkpoint)
    return tokenizer, build_image_processor(config.model), model


def stage_names(config: TrainConfig) -> list[str]:
    """The training stages of the variant, in order."""
    if config.variant == "sft":
        return ["sft"]
    if config.variant == "sft_budget_matched":
        return ["sft", "sft_budget_matched"]
    return ["sft", f"grpo_{config.grpo.mode}"]


def train_stage(config: TrainConfig, shards_dir: str, run_dir: str, stage: str, init_from: str | None) -> str:
    """Run one training stage unless finished; returns its folder."""
    folder = pio.join(run_dir, stage)
    if pio.exists(pio.join(folder, "model.pt")):
        logger.info("%s: finished, skipped", stage)
        return folder
    tokenizer, images, model = load(config, init_from)
    if stage == "sft":
        history = run_sft(model, tokenizer, images, shards_dir, config.sft)
    elif stage == "sft_budget_matched":
        n = len(ShardExamples(shards_dir, "train", config.model.num_points, config.model.quant, shuffle=False))
        budget = total_steps(n, config.grpo)  # as many optimizer steps as the RL stage takes
        history = run_sft(model, tokenizer, images, shards_dir,
                          type(config.sft)(**{**config.sft.__dict__, "max_steps": budget}))
    else:
        history = run_grpo(model, tokenizer, images, shards_dir, config.grpo)
    pio.write_json(pio.join(folder, "history.json"), history)
    save_policy(model.state_dict(), folder)
    return folder


def evaluate_stage(config: TrainConfig, shards_dir: str, run_dir: str, checkpoint: str) -> dict:
    """Predict the test split with ``checkpoint`` and score it (skipped when ``metrics.json`` exists)."""
    folder = pio.join(run_dir, "eval")
    metrics_path = pio.join(folder, "metrics.json")
    if pio.exists(metrics_path):
        return pio.read_json(metrics_path)
    predictions = pio.join(folder, "predictions.jsonl")
    if not pio.exists(predictions):
        tokenizer, images, model = load(config, checkpoint)
        predict(model, tokenizer, images, shards_dir, predictions, max_new_tokens=config.eval_max_new_tokens)
    return run_evaluate(shards_dir, predictions, metrics_path, EvaluateConfig(quant=config.model.quant))


def plot_curves(run_dir: str, stages: list[str]) -> str:
    """Plot loss (and GRPO mean rewards) per step of each finished stage to ``RUN/curves.png``."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:  # pragma: no cover - exercised only without the extra
        raise ImportError("the training-curve plot needs `pip install pointvl[train]`") from e
    import io

    fig, axes = plt.subplots(1, len(stages), figsize=(5 * len(stages), 3.5), squeeze=False)
    for ax, stage in zip(axes[0], stages, strict=True):
        history = pio.read_json(pio.join(run_dir, stage, "history.json"))
        steps = [r["step"] for r in history]
        ax.plot(steps, [r["loss"] for r in history], label="loss")
        for key in ("reward_format", "reward_bbox2d", "reward_bbox3d", "reward_kpts3d", "reward_rpc"):
            if history and key in history[0]:
                ax.plot(steps, [r[key] for r in history], label=key.removeprefix("reward_"))
        ax.set_title(stage)
        ax.set_xlabel("optimizer step")
        ax.legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    path = pio.join(run_dir, "curves.png")
    pio.write_bytes(path, buf.getvalue())
    return path


def run_pipeline(config: TrainConfig, shards_dir: str, run_dir: str) -> dict:
    """All stages of the variant, evaluation and the curves, without an orchestrator (``pointvl train``)."""
    check_config(run_dir, config)
    stages = stage_names(config)
    checkpoint = None
    for stage in stages:
        checkpoint = train_stage(config, shards_dir, run_dir, stage, checkpoint)
    metrics = evaluate_stage(config, shards_dir, run_dir, checkpoint)
    plot_curves(run_dir, stages)
    return metrics
