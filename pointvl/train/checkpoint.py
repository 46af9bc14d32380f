"""Checkpoints in the Hugging Face Trainer layout, resumable and loadable by ``transformers``.

``RUN/<stage>/checkpoint-<step>/``::

    model.safetensors      every tensor of the policy: the language model under its own names (float32
                           master weights of the trainable ones), the point encoder and the fusion
                           modules under ``point_encoder.``, ``cross_norm.``, ``cross_attn.``, ``projector.``
    config.json            the language model's config, with ``pointvl_model`` (the ModelConfig that
                           rebuilds the policy) and ``pointvl_point_token_ids``
    generation_config.json the stop and pad ids only (no sampling settings: pointvl.train.generation)
    tokenizer files
    optimizer.pt, scheduler.pt, rng_state.pth (one process) | rng_state_<rank>.pth (several)
    trainer_state.json     global_step, log_history (one entry per optimizer step: step, loss,
                           learning_rate, ...), the data position; written last: the checkpoint is
                           complete when it exists

``Qwen2_5_VLForConditionalGeneration.from_pretrained(checkpoint)`` loads the language model (it reports
the point/fusion tensors as unexpected keys and skips them); :func:`load_policy` rebuilds the whole
policy. Every file is written atomically. Under several processes every rank calls
:func:`save_checkpoint` (the gathers are collective); rank 0 writes the shared files.
Under DeepSpeed the optimizer state is the engine's own sharded checkpoint (``global_step<N>/``, as the
Trainer writes it), and the float32 weights are consolidated from it.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import os
import random
import re
import tempfile
from typing import Any

import numpy as np
import torch

from pointvl.core import io as pio
from pointvl.train.model import PointVL3D

logger = logging.getLogger(__name__)

TRAINER_STATE = "trainer_state.json"
POINT_MODULES = ("point_encoder", "cross_norm", "cross_attn", "projector")


def checkpoint_steps(stage_dir: str) -> list[int]:
    """Steps of the complete checkpoints under ``stage_dir``, ascending."""
    fs, root = pio.filesystem(stage_dir)
    if not fs.exists(root):
        return []
    steps = []
    for path in fs.ls(root, detail=False):
        match = re.fullmatch(r"checkpoint-(\d+)", path.rstrip("/").rsplit("/", 1)[-1])
        if match and fs.exists(f"{path.rstrip('/')}/{TRAINER_STATE}"):
            steps.append(int(match.group(1)))
    return sorted(steps)


def latest_checkpoint(stage_dir: str) -> str | None:
    steps = checkpoint_steps(stage_dir)
    return pio.join(stage_dir, f"checkpoint-{steps[-1]}") if steps else None


def _tensor_bytes(state: dict[str, torch.Tensor]) -> bytes:
    from safetensors.torch import save

    seen: dict[int, str] = {}
    tensors = {}
    for name, t in state.items():
        if t.data_ptr() in seen and t.numel():  # tied weights (lm_head = embed_tokens): stored once
            continue
        seen[t.data_ptr()] = name
        tensors[name] = t.detach().to("cpu").contiguous()
    return save(tensors, metadata={"format": "pt"})


def policy_state(acc: Any, model: Any) -> dict[str, torch.Tensor] | None:
    """The policy's full state dict on rank 0 (gathered under FSDP and ZeRO-3), None elsewhere."""
    state = acc.get_state_dict(model, unwrap=True)
    return state if acc.is_main_process else None


def to_file_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``lm.x`` -> ``x`` (the language model's own names); the point/fusion modules keep theirs."""
    return {k.removeprefix("lm."): v for k, v in state.items()}


def _torch_bytes(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _rng_name(acc: Any) -> str:
    return "rng_state.pth" if acc.num_processes == 1 else f"rng_state_{acc.process_index}.pth"


def _is_deepspeed(acc: Any) -> bool:
    return acc.distributed_type.value == "DEEPSPEED"


def _is_fsdp(acc: Any) -> bool:
    return acc.distributed_type.value == "FSDP"


def save_checkpoint(
    acc: Any, model: Any, optimizer: Any, scheduler: Any, tokenizer: Any, stage_dir: str, state: dict[str, Any],
    save_total_limit: int | None,
) -> str:
    """Write ``stage_dir/checkpoint-<state['global_step']>/`` (every rank calls this); returns its path."""
    folder = pio.join(stage_dir, f"checkpoint-{state['global_step']}")
    if _is_deepspeed(acc):  # the engine writes its partitioned optimizer/weights itself (collective)
        model.save_checkpoint(folder, tag=f"global_step{state['global_step']}")
        acc.wait_for_everyone()
    weights = _gathered_weights(acc, model, folder)
    optim = _optimizer_state(acc, model, optimizer)
    pio.write_bytes(pio.join(folder, _rng_name(acc)), _torch_bytes(rng_state()))
    if acc.is_main_process:
        policy: PointVL3D = acc.unwrap_model(model)
        config = policy.lm.config.to_dict()
        config["pointvl_model"] = dataclasses.asdict(policy.config)
        config["pointvl_point_token_ids"] = policy.point_token_ids
        pio.write_bytes(pio.join(folder, "model.safetensors"), _tensor_bytes(to_file_names(weights)))
        pio.write_json(pio.join(folder, "config.json"), config)
        pio.write_bytes(pio.join(folder, "generation_config.json"),
                        policy.lm.generation_config.to_json_string().encode())
        with tempfile.TemporaryDirectory() as tmp:
            for name in tokenizer.save_pretrained(tmp):
                if os.path.isfile(name):
                    pio.write_bytes(pio.join(folder, os.path.basename(name)), open(name, "rb").read())
        if optim is not None:
            pio.write_bytes(pio.join(folder, "optimizer.pt"), _torch_bytes(optim))
        pio.write_bytes(pio.join(folder, "scheduler.pt"), _torch_bytes(scheduler.state_dict()))
    acc.wait_for_everyone()  # every rank's RNG file is in place before the checkpoint is marked complete
    if acc.is_main_process:
        pio.write_json(pio.join(folder, TRAINER_STATE), state)
        _prune(stage_dir, save_total_limit)
    acc.wait_for_everyone()
    logger.info("checkpoint %s", folder)
    return folder


def _gathered_weights(acc: Any, model: Any, folder: str) -> dict[str, torch.Tensor] | None:
    if _is_deepspeed(acc):  # float32 master weights consolidated from the engine's shards, not its bf16 copy
        if not acc.is_main_process:
            return None
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return get_fp32_state_dict_from_zero_checkpoint(pio.filesystem(folder)[1])
    return policy_state(acc, model)


def _optimizer_state(acc: Any, model: Any, optimizer: Any) -> dict | None:
    if _is_deepspeed(acc):
        return None  # in the engine's global_step<N>/ folder
    if _is_fsdp(acc):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(model, optimizer.optimizer,
                                        options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return optimizer.state_dict()


def _prune(stage_dir: str, limit: int | None) -> None:
    steps = checkpoint_steps(stage_dir)
    if limit is None or len(steps) <= limit:
        return
    fs, _ = pio.filesystem(stage_dir)
    for step in steps[:-limit]:
        fs.rm(pio.filesystem(pio.join(stage_dir, f"checkpoint-{step}"))[1], recursive=True)


def read_trainer_state(folder: str) -> dict[str, Any]:
    return pio.read_json(pio.join(folder, TRAINER_STATE))


def load_weights(model: PointVL3D, folder: str) -> None:
    """Load ``folder/model.safetensors`` into ``model`` (strict but for tied weights)."""
    from safetensors.torch import load

    state = load(pio.read_bytes(pio.join(folder, "model.safetensors")))
    named = {k if k.startswith(POINT_MODULES) else f"lm.{k}": v for k, v in state.items()}
    result = model.load_state_dict(named, strict=False)
    tied = {"lm.lm_head.weight"} if model.lm.lm_head.weight is model.lm.get_input_embeddings().weight else set()
    if set(result.missing_keys) - tied or result.unexpected_keys:
        raise ValueError(f"{folder}/model.safetensors does not match the policy: missing "
                         f"{sorted(set(result.missing_keys) - tied)[:3]}, unexpected {result.unexpected_keys[:3]}")


def load_training_state(acc: Any, model: Any, optimizer: Any, scheduler: Any, folder: str) -> dict[str, Any]:
    """Restore optimizer, scheduler and this rank's RNG from ``folder`` (weights: :func:`load_weights`,
    before ``prepare``); returns the trainer state."""
    if _is_deepspeed(acc):
        model.load_checkpoint(pio.filesystem(folder)[1], load_module_strict=False)
    else:
        optim = torch.load(io.BytesIO(pio.read_bytes(pio.join(folder, "optimizer.pt"))), weights_only=False)
        if _is_fsdp(acc):
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

            set_optimizer_state_dict(model, optimizer.optimizer, optim,
                                     options=StateDictOptions(full_state_dict=True))
        else:
            optimizer.load_state_dict(optim)
    scheduler.load_state_dict(torch.load(io.BytesIO(pio.read_bytes(pio.join(folder, "scheduler.pt")))))
    set_rng_state(torch.load(io.BytesIO(pio.read_bytes(pio.join(folder, _rng_name(acc)))), weights_only=False))
    return read_trainer_state(folder)


def load_policy(folder: str) -> tuple[Any, PointVL3D]:
    """The tokenizer and the policy of a checkpoint folder, rebuilt from its own files (``config.json``,
    the tokenizer, ``model.safetensors``): no run config, hub download or Point-BERT file is needed."""
    from pointvl.core.strict_config import load
    from pointvl.train.model import build_model, build_tokenizer
    from pointvl.train.train_config import ModelConfig

    saved = load(ModelConfig, pio.read_json(pio.join(folder, "config.json"))["pointvl_model"], "pointvl_model")
    local = dataclasses.replace(
        saved, checkpoint=folder if saved.architecture == "checkpoint" else saved.checkpoint, random_init=True,
        point_bert=dataclasses.replace(saved.point_bert, checkpoint=None, random_init=True),
    )
    tokenizer = build_tokenizer(local)
    model = build_model(local, tokenizer)
    model.config = saved
    load_weights(model, folder)
    return tokenizer, model
