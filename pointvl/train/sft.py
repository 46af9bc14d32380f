"""Stage 1, the structural warm-up (paper §3.2, eq. 5): supervised fine-tuning on the target JSON.

Cross-entropy on the answer tokens only (the prompt and the point placeholders are masked), AdamW,
linear warm-up then a cosine decay to ``learning_rate * min_lr_ratio``, gradient clipping, gradient
accumulation up to the global batch. Runs on one CPU, one GPU or many GPUs through ``accelerate``
(``accelerate launch --config_file pointvl/configs/train/zero3.yaml``: DeepSpeed ZeRO-3, the paper's setup);
each process takes every ``num_processes``-th micro-batch. The same loop runs the SFT budget-matched
baseline (Table 3): more SFT passes from the SFT checkpoint.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator
from typing import Any

import torch

from pointvl.train.config import SFTConfig
from pointvl.train.data import Collator, Example, ShardExamples
from pointvl.train.model import PointVL3D

logger = logging.getLogger(__name__)


def micro_batches(examples: ShardExamples, size: int, rank: int, world: int) -> Iterator[list[Example]]:
    """Consecutive lists of ``size`` examples; process ``rank`` of ``world`` gets every ``world``-th list."""
    batch: list[Example] = []
    k = 0
    for e in examples:
        batch.append(e)
        if len(batch) == size:
            if k % world == rank:
                yield batch
            batch, k = [], k + 1
    if batch and k % world == rank:
        yield batch


def run_sft(
    model: PointVL3D,
    tokenizer: Any,
    image_processor: Any,
    shards_dir: str,
    config: SFTConfig,
) -> list[dict[str, float]]:
    """Train ``model`` in place on the train split; returns one ``{step, loss, lr, seconds}`` per optimizer step."""
    try:
        from accelerate import Accelerator
        from transformers import get_cosine_with_min_lr_schedule_with_warmup
    except ImportError as e:  # pragma: no cover - exercised only without the extra
        raise ImportError("SFT needs `pip install pointvl[train]`") from e

    # 1. data and schedule
    acc = Accelerator()
    per_step = config.per_device_batch_size * acc.num_processes
    if config.batch_size % per_step:
        raise ValueError(
            f"SFTConfig.batch_size ({config.batch_size}) must be a multiple of per_device_batch_size x processes "
            f"({config.per_device_batch_size} x {acc.num_processes})"
        )
    acc.gradient_accumulation_steps = config.batch_size // per_step
    mcfg = model.config
    examples = ShardExamples(shards_dir, "train", mcfg.num_points, mcfg.quant, shuffle=True, seed=config.seed)
    steps_per_epoch = max(1, math.ceil(len(examples) / config.batch_size))
    total = config.max_steps or math.ceil(config.epochs * steps_per_epoch)
    collate = Collator(tokenizer, image_processor, model.num_point_tokens, with_targets=True)

    # 2. optimizer
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)
    scheduler = get_cosine_with_min_lr_schedule_with_warmup(
        optimizer, round(config.warmup_ratio * total), total, min_lr_rate=config.min_lr_ratio
    )
    model, optimizer = acc.prepare(model, optimizer)
    model.train()

    # 3. loop
    history: list[dict[str, float]] = []
    step, losses, start = 0, [], time.perf_counter()
    while step < total:
        for batch in micro_batches(examples, config.per_device_batch_size, acc.process_index, acc.num_processes):
            inputs = {k: v.to(acc.device) for k, v in collate(batch).items()}
            with acc.accumulate(model):
                loss = model(**inputs).loss
                acc.backward(loss)
                if acc.sync_gradients:
                    acc.clip_grad_norm_(params, config.max_grad_norm)
                optimizer.step()
                if acc.sync_gradients:
                    scheduler.step()
                optimizer.zero_grad()
            losses.append(loss.detach().float().item())
            if acc.sync_gradients:
                step += 1
                row = {"step": step, "loss": sum(losses) / len(losses), "lr": scheduler.get_last_lr()[0],
                       "seconds": time.perf_counter() - start}
                history.append(row)
                losses = []
                logger.info("sft %d/%d loss %.4f lr %.2e", step, total, row["loss"], row["lr"])
                if step >= total:
                    break
        examples.epoch += 1
    model.eval()
    return history
