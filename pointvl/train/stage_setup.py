"""What the training stages (SFT, :mod:`pointvl.train.sft`; routed GRPO, :mod:`pointvl.train.grpo`) set up alike.

The process group and the Accelerator (:func:`distributed_state`, :func:`make_accelerator`: one CPU, one GPU,
DDP, FSDP2 or DeepSpeed ZeRO-3, with the stage's ``max_grad_norm`` as DeepSpeed's ``gradient_clipping``), whole
parameters while a model is built after a DeepSpeed stage (:func:`whole_parameters`), and
:func:`start_stage`: the train split's examples and collator, the latest checkpoint's weights, AdamW on the
float32 master weights, ``accelerate.prepare`` and the checkpoint's optimizer, scheduler, RNG and stream
position (:class:`Stage`). Each stage keeps its own batch relations, schedule and loop.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from pointvl.train import checkpoint as ckpt
from pointvl.train.data import Collator, ShardExamples
from pointvl.train.model import PointVL3D

logger = logging.getLogger(__name__)

StepCallback = Callable[[int, int, dict[str, float]], None]
"""``on_step(step, total, row)`` of a training loop: after each optimizer step, with its ``history.json`` row."""


def make_accelerator(gradient_accumulation_steps: int, micro_batch_size: int, max_grad_norm: float) -> Any:
    """The Accelerator of a stage. Under DeepSpeed the engine is told the micro-batch (no DataLoader here) and
    the stage's ``max_grad_norm`` as its ``gradient_clipping`` (the engine clips; :func:`pointvl.train.train_config.
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


@dataclass
class Stage:
    """A stage ready for its loop (:func:`start_stage`).

    Attributes:
        acc: the Accelerator.
        model, optimizer: as ``acc.prepare`` returned them.
        scheduler: the learning-rate schedule of ``optimizer``.
        params: the prepared model's trainable parameters (what is clipped).
        examples: the train split, shuffled with the stage config's ``seed``.
        collate: the Collator of the stage's batches.
        n: the number of training examples.
        total: the stage's optimizer steps.
        step, history: where the run stands (0 and ``[]``, or the resumed checkpoint's).
    """

    acc: Any
    model: Any
    optimizer: torch.optim.Optimizer
    scheduler: Any
    params: list[torch.nn.Parameter]
    examples: ShardExamples
    collate: Collator
    n: int
    total: int
    step: int
    history: list[dict]


def start_stage(
    acc: Any,
    model: PointVL3D,
    tokenizer: Any,
    image_processor: Any,
    shards_dir: str,
    config: Any,
    stage_dir: str | None,
    *,
    steps: Callable[[int], int],
    with_targets: bool,
    weight_decay: float,
    schedule: Callable[[torch.optim.Optimizer, int], Any],
) -> Stage:
    """Data, optimizer and resume of a stage run by ``acc``: the train split (shuffled with ``config.seed``) and its
    Collator (``with_targets``: the answer tokens as labels), ``steps(n)`` optimizer steps for ``n`` examples, the
    latest checkpoint of ``stage_dir`` (its weights loaded before the optimizer is made), AdamW at
    ``config.learning_rate`` and ``weight_decay`` on the float32 master weights with ``schedule(optimizer, total)``,
    ``acc.prepare``, then the checkpoint's optimizer, scheduler, RNG and stream position."""
    mcfg = model.config
    examples = ShardExamples(shards_dir, "train", mcfg.num_points, mcfg.quant, shuffle=True, seed=config.seed)
    n = len(examples)
    total = steps(n)
    collate = Collator(tokenizer, image_processor, model.num_point_tokens, with_targets=with_targets)
    folder = resume(acc, model, stage_dir)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=weight_decay)
    scheduler = schedule(optimizer, total)
    model, optimizer = acc.prepare(model, optimizer)
    params = [p for p in model.parameters() if p.requires_grad]
    step, history = 0, []
    if folder is not None:
        state = ckpt.load_training_state(acc, model, optimizer, scheduler, folder)
        step, history = state["global_step"], state["log_history"]
    return Stage(acc, model, optimizer, scheduler, params, examples, collate, n, total, step, history)
