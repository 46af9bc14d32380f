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

import contextlib
import logging
import math
import os
import time
from collections.abc import Iterator
from typing import Any

import torch

from pointvl.train import checkpoint as ckpt
from pointvl.train.config import SFTConfig
from pointvl.train.data import Collator, ShardExamples
from pointvl.train.model import PointVL3D

logger = logging.getLogger(__name__)


def make_accelerator(gradient_accumulation_steps: int, micro_batch_size: int, max_grad_norm: float) -> Any:
    """The Accelerator of a stage. Under DeepSpeed the engine is told the micro-batch (no DataLoader here) and
    the stage's ``max_grad_norm`` as its ``gradient_clipping`` (the engine clips; :func:`pointvl.train.config.
    preflight` refuses a DeepSpeed config that sets another value)."""
    try:
        from accelerate import Accelerator
    except ImportError as e:  # pragma: no cover - exercised only without the extra
        raise ImportError("training needs `pip install pointvl[train]`") from e
    distributed_state()  # the process group first, formed as distributed_state says
    acc = Accelerator(gradient_accumulation_steps=gradient_accumulation_steps, cpu=_group_kwargs()["cpu"])
    if acc.state.deepspeed_plugin is not None:
        ds = acc.state.deepspeed_plugin.deepspeed_config
        ds["train_micro_batch_size_per_gpu"] = micro_batch_size
        ds["gradient_accumulation_steps"] = gradient_accumulation_steps
        ds["train_batch_size"] = micro_batch_size * gradient_accumulation_steps * acc.num_processes
        ds["gradient_clipping"] = max_grad_norm
    return acc


def is_deepspeed_launch() -> bool:
    """Whether this process was started by ``accelerate launch`` with a DeepSpeed config."""
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def _group_kwargs() -> dict[str, Any]:
    """How accelerate forms the launch's process group. On a machine without CUDA: a gloo CPU group, which
    accelerate only forms when told ``cpu``; under DeepSpeed, DeepSpeed's own group over gloo, because
    accelerate 1.15 turns DeepSpeed off when told ``cpu`` (``accelerate/state.py`` 974:
    ``elif os.environ.get("ACCELERATE_USE_DEEPSPEED", ...) == "true" and not cpu``) and, without a backend
    name, counts one process (state.py 288: ``if self.backend is None: ... self.num_processes = 1``)."""
    if torch.cuda.is_available():
        return {"cpu": False}
    if is_deepspeed_launch():
        return {"cpu": False, "backend": "gloo"}
    return {"cpu": True}


def distributed_state() -> Any:
    """accelerate's process state; on a machine without CUDA the processes of a launch (``accelerate launch
    --multi_gpu``, i.e. torchrun) form a gloo CPU group, DeepSpeed's included (:func:`_group_kwargs`)."""
    from accelerate import PartialState

    return PartialState(**_group_kwargs())


@contextlib.contextmanager
def whole_parameters() -> Iterator[None]:
    """Build and run models with whole (unpartitioned) parameters, even after a DeepSpeed stage in this process.

    Every stage builds its policy whole on each rank and the engine partitions it in ``prepare``
    (``zero3_init_flag: false`` in the configs). But the first DeepSpeed Accelerator of a process leaves a
    ZeRO-3 ``HfDeepSpeedConfig`` registered for the rest of it, whatever ``zero3_init_flag`` says:
    accelerate 1.15 ``utils/dataclasses.py`` 1488, ``self.dschf = HfDeepSpeedConfig(ds_config)  # keep this
    object alive`` (the flag, 1463, only decides whether transformers must be installed), run by
    ``DeepSpeedPlugin.select`` from ``AcceleratorState`` (``state.py`` 978). transformers 5.23 reads it back
    (``integrations/deepspeed.py`` 284, ``is_deepspeed_zero3_enabled``): ``from_pretrained``
    (``modeling_utils.py`` 3811) and ``_from_config`` (1435) then build the next stage's model under
    ``deepspeed.zero.Init``. transformers fills those partitioned parameters from the checkpoint itself (4536), but
    every parameter is a ``torch.Size([0])`` stub on each rank, so loading the previous stage's
    ``model.safetensors`` fails (``size mismatch ... the shape in current model is torch.Size([0])``, seen
    on 2 CPU ranks) and ``predict`` would decode without an engine to gather them. ``generate`` also reads it
    (``generation/utils.py`` 2566, ``synced_gpus``): every rank would wait for the others at each token, which
    needs every rank to decode the same number of batches. So the registration is lifted while a stage
    builds its model, and while ``predict`` runs, and restored after.
    """
    from transformers.integrations import deepspeed as hf_deepspeed

    ref = hf_deepspeed._hf_deepspeed_config_weak_ref
    registered = ref() if ref is not None else None
    if registered is None:
        yield
        return
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_deepspeed.set_hf_deepspeed_config(registered)


def num_processes() -> int:
    return distributed_state().num_processes


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


def trainer_state(step: int, total: int, history: list[dict], samples: int, config: Any, n: int) -> dict:
    """``trainer_state.json`` in the Trainer's keys, plus the stream position (``pointvl_samples``)."""
    return {"global_step": step, "max_steps": total, "epoch": samples / n, "log_history": history,
            "save_steps": config.save_steps, "pointvl_samples": samples}


def resume(acc: Any, model: PointVL3D, stage_dir: str | None) -> str | None:
    """The latest complete checkpoint of ``stage_dir`` (its weights loaded into ``model``), or None."""
    folder = ckpt.latest_checkpoint(stage_dir) if stage_dir else None
    if folder is not None:
        ckpt.load_weights(model, folder)
        logger.info("resuming from %s", folder)
    return folder


def run_sft(
    model: PointVL3D,
    tokenizer: Any,
    image_processor: Any,
    shards_dir: str,
    config: SFTConfig,
    stage_dir: str | None = None,
) -> list[dict[str, float]]:
    """Train ``model`` in place on the train split; returns one ``{step, loss, learning_rate, ...}`` per
    optimizer step (the whole run's, a resumed one included). With ``stage_dir``: checkpoints and resume."""
    # 1. data and schedule
    processes = num_processes()
    per_step = config.per_device_batch_size * processes
    if config.batch_size % per_step:
        raise ValueError(
            f"SFTConfig.batch_size ({config.batch_size}) must be a multiple of per_device_batch_size x processes "
            f"({config.per_device_batch_size} x {processes})"
        )
    acc = make_accelerator(config.batch_size // per_step, config.per_device_batch_size, config.max_grad_norm)
    mcfg = model.config
    examples = ShardExamples(shards_dir, "train", mcfg.num_points, mcfg.quant, shuffle=True, seed=config.seed)
    n = len(examples)
    total = sft_steps(n, config)
    collate = Collator(tokenizer, image_processor, model.num_point_tokens, with_targets=True)

    # 2. optimizer (on the float32 master weights), resume
    folder = resume(acc, model, stage_dir)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)
    scheduler = make_scheduler(optimizer, config, total)
    model, optimizer = acc.prepare(model, optimizer)
    params = [p for p in model.parameters() if p.requires_grad]
    step, history = 0, []
    if folder is not None:
        state = ckpt.load_training_state(acc, model, optimizer, scheduler, folder)
        step, history = state["global_step"], state["log_history"]
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
        if stage_dir and (step % config.save_steps == 0 or step == total):
            ckpt.save_checkpoint(acc, model, optimizer, scheduler, tokenizer, stage_dir,
                                 trainer_state(step, total, history, step * config.batch_size, config, n),
                                 config.save_total_limit)
    model.eval()
    return history
