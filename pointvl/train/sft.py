"""Stage 1, the structural warm-up (paper §3.2, eq. 5): supervised fine-tuning on the target JSON.

Cross-entropy on the answer tokens only (the prompt and the point placeholders are masked), AdamW on the
float32 master weights, linear warm-up then a cosine decay to ``learning_rate * min_lr_ratio`` (or a
constant rate), gradient clipping, gradient accumulation up to the global batch. Runs on one CPU, one
GPU or many processes through ``accelerate launch`` (DDP, FSDP2, DeepSpeed ZeRO-3; configs in
``pointvl/configs/train/``).

**Data parallelism equal to one process.** The training samples form one stream, pass after pass
(each pass shuffled with ``seed + pass``); optimizer step ``s`` trains on stream positions
``[s * B, (s + 1) * B)`` (``B = batch_size``, the global batch), cut into micro-batches of
``per_device_batch_size``; micro-batch ``k`` of the step goes to rank ``k % processes``. Each rank
accumulates its micro-batches and the gradients are averaged over ranks, so a step's gradient is the
mean of the same micro-batch losses however many processes run it, and the logged loss is that mean.

**Resume.** With a ``stage_dir``, a checkpoint (:mod:`pointvl.train.checkpoint`) is written every
``save_steps`` and at the end; a run restarts from the latest complete one (weights, optimizer,
scheduler, RNG, stream position) and ends with the weights of an uninterrupted run.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import torch

from pointvl.train import checkpoint as ckpt
from pointvl.train.model import PointVL3D
from pointvl.train.stage_setup import StepCallback, make_accelerator, num_processes, start_stage, trainer_state
from pointvl.train.train_config import SFTConfig

logger = logging.getLogger(__name__)


def sft_steps(num_samples: int, config: SFTConfig) -> int:
    """Optimizer steps of an SFT run on ``num_samples`` prompts: ``max_samples`` / ``max_steps`` / ``epochs``."""
    if config.max_samples is not None:
        return max(1, math.ceil(config.max_samples / config.batch_size))
    return config.max_steps or max(1, math.ceil(config.epochs * num_samples / config.batch_size))


def make_scheduler(optimizer: torch.optim.Optimizer, config: SFTConfig, total: int) -> Any:
    from transformers import get_constant_schedule, get_cosine_with_min_lr_schedule_with_warmup

    if config.schedule == "constant":
        return get_constant_schedule(optimizer)
    return get_cosine_with_min_lr_schedule_with_warmup(
        optimizer, round(config.warmup_ratio * total), total, min_lr_rate=config.min_lr_ratio
    )


def run_sft(
    model: PointVL3D,
    tokenizer: Any,
    image_processor: Any,
    shards_dir: str,
    config: SFTConfig,
    stage_dir: str | None = None,
    on_step: StepCallback | None = None,
) -> list[dict[str, float]]:
    """Train ``model`` in place on the train split; returns one ``{step, loss, learning_rate, ...}`` per
    optimizer step (the whole run's, a resumed one included). With ``stage_dir``: checkpoints and resume;
    ``on_step(step, total, row)`` after each step (progress for whoever runs it)."""
    # 1. the batch relations and the accelerator
    processes = num_processes()
    per_step = config.per_device_batch_size * processes
    if config.batch_size % per_step:
        raise ValueError(
            f"SFTConfig.batch_size ({config.batch_size}) must be a multiple of per_device_batch_size x processes "
            f"({config.per_device_batch_size} x {processes})"
        )
    acc = make_accelerator(config.batch_size // per_step, config.per_device_batch_size, config.max_grad_norm)

    # 2. data, optimizer (on the float32 master weights), resume: as every stage (stage_setup.start_stage)
    stage = start_stage(acc, model, tokenizer, image_processor, shards_dir, config, stage_dir,
                        steps=lambda n: sft_steps(n, config), with_targets=True, weight_decay=config.weight_decay,
                        schedule=lambda optimizer, total: make_scheduler(optimizer, config, total))
    model, optimizer, scheduler, params = stage.model, stage.optimizer, stage.scheduler, stage.params
    examples, collate, n, total, step, history = (stage.examples, stage.collate, stage.n, stage.total, stage.step,
                                                  stage.history)
    model.train()

    # 3. loop: step s trains on stream positions [s * B, (s + 1) * B); micro-batch k goes to rank k % P
    m, rank = config.per_device_batch_size, acc.process_index
    stream = examples.stream(step * config.batch_size, keep=lambda p: (p // m) % processes == rank)
    while step < total:
        start, losses, tokens = time.perf_counter(), [], 0
        for _ in range(acc.gradient_accumulation_steps):
            batch = [next(stream)[1] for _ in range(m)]
            inputs = {k: v.to(acc.device) for k, v in collate(batch).items()}
            tokens += int(inputs["attention_mask"].sum())
            with acc.accumulate(model):
                loss = model(**inputs).loss
                acc.backward(loss)
                if acc.sync_gradients:
                    acc.clip_grad_norm_(params, config.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad()
            losses.append(loss.detach().float())
        lr = scheduler.get_last_lr()[0]
        scheduler.step()
        step += 1
        stats = acc.reduce(torch.stack([torch.stack(losses).mean(), torch.tensor(float(tokens))]).to(acc.device),
                           "sum")
        row = {"step": step, "loss": stats[0].item() / processes, "learning_rate": lr,
               "samples": step * config.batch_size, "tokens": stats[1].item(),
               "seconds": time.perf_counter() - start}
        history.append(row)
        logger.info("sft %d/%d loss %.4f lr %.2e", step, total, row["loss"], lr)
        if on_step is not None:
            on_step(step, total, row)
        if stage_dir and (step % config.save_steps == 0 or step == total):
            ckpt.save_checkpoint(acc, model, optimizer, scheduler, tokenizer, stage_dir,
                                 trainer_state(step, total, history, step * config.batch_size, config, n),
                                 config.save_total_limit)
    model.eval()
    return history
