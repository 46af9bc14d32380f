"""Configs of the training flow: the model, SFT, routed GRPO, and the presets (paper §4.2).

Defaults are the paper's where it states them (§4.2: Qwen2.5-VL-3B-Instruct, Point-BERT frozen with
trainable cross-attention, SFT 2 epochs at batch 128 with AdamW and a cosine schedule, RL 1 epoch with
group size 8, λ = 0.15). The paper's learning rates, point count and image size did not survive in
its text; the values here are ours and say so.
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import yaml

from pointvl.core import io as pio
from pointvl.core.errors import InputError
from pointvl.core.spatial import QuantConfig
from pointvl.core.strict_config import ConfigError, check, load, merge, nest, read_file
from pointvl.grca import GRCAConfig
from pointvl.train.point_bert import PointBertConfig, check_point_dims, read_checkpoint
from pointvl.train.variants import GRPO_MODES, PRESET_NAMES, VARIANTS

if TYPE_CHECKING:
    from pointvl.dataset.handoff import HandoffConfig

logger = logging.getLogger(__name__)

ARCHITECTURES = ("checkpoint", "tiny", "3b")
ROLLOUT_ENGINES = ("hf", "vllm")
LOSS_TYPES = ("grpo", "dapo", "dr_grpo")
"""``pointvl.grca.loss.LOSS_TYPES``, named here without importing torch (a test keeps the two equal)."""


@dataclass
class ModelConfig:
    """The PointVL-3D policy (§3.1, §4.2).

    Attributes:
        checkpoint: Qwen2.5-VL checkpoint (hub id or folder) used when ``architecture="checkpoint"``.
        architecture: ``"checkpoint"`` (the checkpoint's config and tokenizer), ``"tiny"`` (a ~0.5M
            parameter Qwen2.5-VL-shaped model and a character tokenizer built in code, for CPU tests) or
            ``"3b"`` (Qwen2.5-VL-3B's shapes built in code, random weights: benchmarks without downloads).
        random_init: with ``"checkpoint"``, build the architecture with random weights (no weights read).
        point_bert: the frozen point encoder; set ``point_bert.checkpoint`` to load released weights.
        num_points: points per cloud fed to Point-BERT (8192, PointLLM's setting; the paper's number is lost).
        image_size: images are resized to ``image_size`` x ``image_size`` (448; a multiple of 28).
        cross_attn_heads: heads of the geometry-guided cross-attention (point tokens attend to image tokens).
        freeze_vision: keep Qwen's vision tower frozen (its tokens only feed the cross-attention).
        gradient_checkpointing: recompute the language model's activations in backward.
        dtype: compute precision, ``"bfloat16"`` (mixed precision: trainable parameters and optimizer
            state stay float32 master weights, forward and backward run under bf16 autocast, frozen
            parts are stored in bf16) or ``"float32"``.
        quant: the coordinate bins of the output (``docs/design.md#quantization``).
    """

    checkpoint: str = "Qwen/Qwen2.5-VL-3B-Instruct"
    architecture: str = "checkpoint"
    random_init: bool = False
    point_bert: PointBertConfig = field(default_factory=PointBertConfig)
    num_points: int = 8192
    image_size: int = 448
    cross_attn_heads: int = 8
    freeze_vision: bool = True
    gradient_checkpointing: bool = True
    dtype: str = "bfloat16"
    quant: QuantConfig = field(default_factory=QuantConfig)

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"ModelConfig.architecture must be one of {ARCHITECTURES}, got {self.architecture!r}")
        if self.image_size % 28:
            raise ValueError(f"ModelConfig.image_size must be a multiple of 28 (Qwen2.5-VL), got {self.image_size}")
        if self.num_points < self.point_bert.num_group:
            raise ValueError(f"num_points ({self.num_points}) must be >= point_bert.num_group")
        if self.point_bert.trans_dim % self.cross_attn_heads:
            raise ValueError("point_bert.trans_dim must be divisible by cross_attn_heads")
        if self.dtype not in ("bfloat16", "float32"):
            raise ValueError(f"ModelConfig.dtype must be 'bfloat16' or 'float32', got {self.dtype!r}")


@dataclass
class StageConfig:
    """The fields every training stage has (:class:`SFTConfig`, :class:`GRPOTrainConfig`), with their checks.

    A stage states its own ``epochs``, ``learning_rate`` and ``save_steps`` defaults; the others are shared.
    :func:`pointvl.train.stage_setup.start_stage` reads ``seed`` and ``learning_rate``,
    :func:`pointvl.train.stage_setup.make_accelerator` is given ``max_grad_norm``.

    Attributes:
        epochs: passes over the train split.
        learning_rate: (peak) AdamW learning rate.
        save_steps: write ``checkpoint-<step>/`` every this many optimizer steps (and at the end).
        max_grad_norm: gradient clipping (1.0; DeepSpeed's ``gradient_clipping`` under a DeepSpeed launch).
        max_steps: stop after this many optimizer steps (None: the epochs decide).
        save_total_limit: keep this many most recent checkpoints (None: all).
        seed: data order seed (and the stage's own use of it: initialisation, sampling).
    """

    epochs: float
    learning_rate: float
    save_steps: int
    max_grad_norm: float = 1.0
    max_steps: int | None = None
    save_total_limit: int | None = 2
    seed: int = 0

    def __post_init__(self) -> None:
        _check_saving(type(self).__name__, self.save_steps, self.save_total_limit)


@dataclass
class SFTConfig(StageConfig):
    """Stage 1, the structural warm-up (§3.2, §4.2): cross-entropy on the answer tokens only.

    Attributes:
        epochs: passes over the train split (2).
        batch_size: global batch = per_device_batch_size x gradient_accumulation_steps x processes (128).
        per_device_batch_size: examples per forward pass (4).
        learning_rate: peak AdamW learning rate (1e-5; the paper's value is lost).
        min_lr_ratio: the cosine schedule decays to ``learning_rate * min_lr_ratio`` (0.1).
        warmup_ratio: linear warm-up share of the steps (0.03).
        weight_decay: AdamW weight decay (0.0).
        max_grad_norm: gradient clipping (1.0).
        max_steps: stop after this many optimizer steps (None: all epochs); for demos.
        max_samples: stop after this many training samples (prompts with their answer); the budget-matched
            baseline sets it; None: ``epochs``/``max_steps`` decide.
        schedule: ``"cosine"`` (warm-up then cosine decay) or ``"constant"`` (``learning_rate`` throughout).
        save_steps: write ``checkpoint-<step>/`` every this many optimizer steps (and at the end).
        save_total_limit: keep this many most recent checkpoints (None: all).
        seed: data order and initialisation seed.
    """

    epochs: float = 2.0
    batch_size: int = 128
    per_device_batch_size: int = 4
    learning_rate: float = 1e-5
    min_lr_ratio: float = 0.1
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    max_samples: int | None = None
    schedule: str = "cosine"
    save_steps: int = 500

    def __post_init__(self) -> None:
        super().__post_init__()  # save_steps, save_total_limit
        if self.schedule not in ("cosine", "constant"):
            raise ValueError(f"SFTConfig.schedule must be 'cosine' or 'constant', got {self.schedule!r}")
        if self.batch_size % self.per_device_batch_size:
            raise ValueError(
                f"SFTConfig.batch_size ({self.batch_size}) must be a multiple of per_device_batch_size "
                f"({self.per_device_batch_size})"
            )
        if not (self.epochs > 0 and self.learning_rate > 0 and 0 <= self.min_lr_ratio <= 1):
            raise ValueError("SFTConfig needs epochs > 0, learning_rate > 0 and min_lr_ratio in [0, 1]")


@dataclass
class GRPOTrainConfig(StageConfig):
    """Stage 2, routed GRPO (§3.3-3.5, §4.2).

    Attributes:
        mode: ``"broadcast"`` (vanilla GRPO), ``"grca"`` or ``"grca_rpc"`` (the paper's method).
        lam: λ, weight of the standardised RPC advantage on background tokens (0.15).
        num_generations: group size G (8).
        epochs: passes over the train split (1).
        prompts_per_step: prompts per optimizer step over all processes (each gives G samples), split
            evenly across the data-parallel ranks, so the step does not depend on the process count (4).
        learning_rate: AdamW learning rate (1e-6; the paper's value is lost).
        clip_eps: PPO clipping ε (0.2).
        loss_type: how the clipped surrogate is normalised, with TRL 1.16 ``GRPOTrainer``'s names and
            formulas (:mod:`pointvl.grca.loss`): ``"grpo"`` (token mean per sequence, then mean over
            sequences: the paper's eq. 16, default), ``"dapo"`` (token mean over the optimizer step's
            completions, TRL's default) or ``"dr_grpo"`` (sum over tokens / (sequences x max_new_tokens)).
        beta: KL weight to the reference policy (0: no reference model).
        temperature, top_p, top_k: sampling of the rollouts (1.0, 1.0, 0). The trained log-probabilities are
            those of the logits divided by ``temperature`` (as TRL): the distribution the samples come from. Keep
            ``top_k`` 0 and ``top_p`` 1 (they disable those filters) for the samples to be exactly that
            distribution's. Nothing comes from the checkpoint's ``generation_config.json``
            (:mod:`pointvl.train.generation`).
        max_new_tokens: generation budget per sample (1024; the canonical output is ~600 tokens).
        max_grad_norm: gradient clipping (1.0).
        max_steps: stop after this many optimizer steps (None: one pass).
        logprob_chunk: completion tokens per chunk of the log-softmax over the vocabulary (no
            full-vocabulary float32 tensor for the whole group is made).
        rollout_engine: ``"hf"`` (transformers ``generate``; the only engine built) or ``"vllm"``
            (the interface is named; the engine needs a GPU and is not built yet: preflight refuses it).
        save_steps, save_total_limit: checkpoints, as in :class:`SFTConfig`.
        grca: span/background/bin options of the scoring (:class:`pointvl.grca.GRCAConfig`).
        seed: sampling seed; each prompt's group is sampled with ``seed`` and the prompt's position in
            the run, so the samples do not depend on the process count or on a resume.
    """

    mode: str = "grca_rpc"
    lam: float = 0.15
    num_generations: int = 8
    epochs: float = 1.0
    prompts_per_step: int = 4
    learning_rate: float = 1e-6
    clip_eps: float = 0.2
    loss_type: str = "grpo"
    beta: float = 0.0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 1024
    logprob_chunk: int = 256
    rollout_engine: str = "hf"
    save_steps: int = 50
    grca: GRCAConfig = field(default_factory=GRCAConfig)

    def __post_init__(self) -> None:
        if self.mode not in GRPO_MODES:
            raise ValueError(f"GRPOTrainConfig.mode must be broadcast, grca or grca_rpc, got {self.mode!r}")
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(
                f"GRPOTrainConfig.loss_type must be one of {LOSS_TYPES} (TRL's names), got {self.loss_type!r}"
            )
        if self.num_generations < 2:
            raise ValueError("GRPOTrainConfig.num_generations must be >= 2 (group standardisation; paper: 8)")
        if self.beta > 0:
            raise ValueError("GRPOTrainConfig.beta > 0 needs a reference model, which is not implemented; use 0")
        if self.rollout_engine not in ROLLOUT_ENGINES:
            raise ValueError(
                f"GRPOTrainConfig.rollout_engine must be one of {ROLLOUT_ENGINES}, got {self.rollout_engine!r}"
            )
        if not (self.temperature > 0 and 0 < self.top_p <= 1 and self.top_k >= 0):
            raise ValueError("GRPOTrainConfig needs temperature > 0, top_p in (0, 1] and top_k >= 0 (0: no top-k)")
        if min(self.prompts_per_step, self.logprob_chunk, self.max_new_tokens) < 1:
            raise ValueError("GRPOTrainConfig.prompts_per_step, logprob_chunk and max_new_tokens must be >= 1")
        super().__post_init__()  # save_steps, save_total_limit


def _check_saving(name: str, save_steps: int, save_total_limit: int | None) -> None:
    if save_steps < 1 or (save_total_limit is not None and save_total_limit < 1):
        raise ValueError(f"{name}.save_steps must be >= 1 and save_total_limit None or >= 1")


@dataclass
class TrainConfig:
    """One run of the training flow: which Table 3 variant, on which model, with which stage configs.

    Attributes:
        variant: one of :data:`VARIANTS`; ``sft`` stops after SFT, ``sft_budget_matched`` continues SFT
            for as many training samples as the RL stage trains on (:func:`budget_matched_sft`), the
            others run GRPO in that mode after SFT.
        model, sft, grpo: the component configs.
        eval_max_new_tokens: generation budget of ``predict`` (1024).
        eval_batch_size: prompts decoded together per rank by ``predict`` (8).
    """

    variant: str = "grca_rpc"
    model: ModelConfig = field(default_factory=ModelConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    grpo: GRPOTrainConfig = field(default_factory=GRPOTrainConfig)
    eval_max_new_tokens: int = 1024
    eval_batch_size: int = 8

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(f"TrainConfig.variant must be one of {VARIANTS}, got {self.variant!r}")
        if self.variant in GRPO_MODES and self.grpo.mode != self.variant:
            raise ValueError(f"variant {self.variant!r} runs GRPO in that mode: set grpo.mode={self.variant!r}")
        if self.grpo.grca.quant != self.model.quant:
            raise ValueError("grpo.grca.quant must equal model.quant: rewards must read the bins the model writes")

    def to_dict(self) -> dict:
        return asdict(self)


def paper_preset(variant: str = "grca_rpc") -> TrainConfig:
    """The paper's setup (§4.2) for one Table 3 row. Point-BERT's weights must be given
    (``model.point_bert.checkpoint``) or random weights asked for (``model.point_bert.random_init``); the
    encoder takes xyz + rgb (``point_dims=6``), as PointLLM's ``point_bert_v1.2.pt`` does."""
    mode = variant if variant in GRPO_MODES else "grca_rpc"
    return TrainConfig(variant=variant, model=ModelConfig(point_bert=PointBertConfig(point_dims=6)),
                       grpo=GRPOTrainConfig(mode=mode))


def tiny_preset(variant: str = "grca_rpc") -> TrainConfig:
    """A CPU-sized run of the same flow: tiny random model, short schedules (``make train-demo``)."""
    mode = variant if variant in GRPO_MODES else "grca_rpc"
    return TrainConfig(
        variant=variant,
        model=ModelConfig(
            architecture="tiny",
            point_bert=PointBertConfig(trans_dim=32, depth=2, num_heads=2, num_group=16, group_size=16,
                                       encoder_dims=64, random_init=True),
            num_points=256,
            image_size=56,
            cross_attn_heads=2,
            gradient_checkpointing=False,
            dtype="float32",
        ),
        # 600 steps: enough for the tiny model to write parseable JSON on the demo's shards (~3 min here)
        sft=SFTConfig(epochs=100, batch_size=4, per_device_batch_size=4, learning_rate=3e-3, warmup_ratio=0.05,
                      max_steps=600),
        grpo=GRPOTrainConfig(mode=mode, num_generations=4, prompts_per_step=1, learning_rate=1e-4,
                             max_new_tokens=700, max_steps=4),
        eval_max_new_tokens=700,
    )


PRESETS = dict(zip(PRESET_NAMES, (paper_preset, tiny_preset), strict=True))


def preset_config(preset: str, variant: str, overrides: dict | None) -> TrainConfig:
    """The preset for ``variant`` with ``overrides`` merged in, through the strict loader
    (:mod:`pointvl.core.strict_config`) every other entry point uses.

    ``overrides`` nests like :class:`TrainConfig` (``{"sft": {"max_steps": 6}}``), uses dotted paths
    (``{"sft.max_steps": 6}``) or mixes both; a full ``TrainConfig.to_dict()`` (a run's ``config.json``)
    reproduces that config. Unknown keys, wrong types and invalid values raise :class:`ConfigError` (one line).
    """
    if preset not in PRESETS:
        raise ConfigError(f"preset must be one of {sorted(PRESETS)}, got {preset!r}")
    nested = nest(TrainConfig, dict(overrides or {}))
    for given in (variant, nested.get("variant", variant)):
        if given not in VARIANTS:
            raise ConfigError(f"variant must be one of {VARIANTS}, got {given!r}")
    variant = nested.get("variant", variant)
    # the preset of the variant asked for runs GRPO in that mode, unless the overrides set grpo.mode
    try:
        return load(TrainConfig, merge(TrainConfig, PRESETS[preset](variant).to_dict(), nested))
    except ConfigError as err:
        raise ConfigError(f"invalid training config: {err}") from None


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """``["sft.max_steps=6", "grpo.lam=0.3"]`` (repeatable ``--set KEY=VALUE``) -> a nested overrides dict.

    Values are read as YAML (``6`` an int, ``0.3`` a float, ``null``, ``true``, ``/w/x.pt`` a string);
    keys must be dotted :class:`TrainConfig` paths. ConfigError (one line, naming the key) otherwise.
    """
    flat: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"--set {pair!r}: expected KEY=VALUE with a dotted TrainConfig key (sft.max_steps=6)")
        try:
            flat[key] = pio.parse_yaml(raw) if raw.strip() else ""
        except yaml.YAMLError as err:
            raise ConfigError(f"--set {key}: value {raw!r} is not valid YAML ({str(err).splitlines()[0]})") from err
    nested = nest(TrainConfig, flat)
    check(TrainConfig, nested)
    return nested


def read_config_file(path: str) -> dict[str, Any]:
    """Nested overrides from a TrainConfig YAML/JSON file (a run's ``config.json`` or some of its fields,
    nested or dotted); ConfigError (one line) for a missing file, bad YAML or an unknown key."""
    nested = nest(TrainConfig, read_file(path))
    check(TrainConfig, nested)
    return nested


def command_line_overrides(config_file: str | None, pairs: list[str]) -> dict[str, Any]:
    """The overrides of ``--config FILE`` (if given) with every ``--set KEY=VALUE`` merged over them."""
    return merge(TrainConfig, read_config_file(config_file) if config_file else {}, parse_overrides(pairs))


def _hf_cached(repo_id: str, filename: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(repo_id, filename), str)


def preflight(config: TrainConfig, processes: int | None = None) -> None:
    """Raise InputError (one line) when a training job with ``config`` cannot start on this machine.

    Cheap (no model is loaded, no process group is formed), so it runs before any stage: the weights
    (:func:`check_weights`), the batch relations for ``processes`` data-parallel ranks (default: the launch's
    ``WORLD_SIZE``, :func:`check_processes`) and, under an ``accelerate launch`` with DeepSpeed, the engine
    settings the train config owns (:func:`check_deepspeed_launch`).
    """
    check_weights(config)
    check_processes(config, launch_processes() if processes is None else processes)
    check_deepspeed_launch(config)


def launch_processes() -> int:
    """The process count of the launch this process belongs to (``WORLD_SIZE``, which ``accelerate launch``
    and torchrun set in every process; 1 outside a launch)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def check_processes(config: TrainConfig, processes: int) -> None:
    """Every batch relation of the stages the variant runs, for ``processes`` data-parallel ranks.

    SFT (and the budget-matched SFT) steps on ``sft.batch_size`` samples: micro-batches of
    ``sft.per_device_batch_size``, the same number on every rank, so the batch must divide by
    ``per_device_batch_size x processes``. GRPO steps on ``grpo.prompts_per_step`` prompts split evenly over
    the ranks (each rank samples the ``num_generations`` group of its prompts and trains on it as one
    micro-batch), so the prompts must divide by the process count.
    """
    sft = config.sft
    per_step = sft.per_device_batch_size * processes
    if sft.batch_size % per_step:
        fit = -(-sft.batch_size // per_step) * per_step
        raise InputError(
            f"sft.batch_size ({sft.batch_size}) must be a multiple of sft.per_device_batch_size x processes "
            f"({sft.per_device_batch_size} x {processes} = {per_step}): set sft.batch_size={fit}, change "
            "sft.per_device_batch_size, or launch another number of processes"
        )
    grpo = config.grpo
    if config.variant in GRPO_MODES and grpo.prompts_per_step % processes:
        fit = -(-grpo.prompts_per_step // processes) * processes
        raise InputError(
            f"grpo.prompts_per_step ({grpo.prompts_per_step}) must be a multiple of the process count ({processes}): "
            f"set grpo.prompts_per_step={fit} or launch another number of processes"
        )


def check_deepspeed_launch(config: TrainConfig) -> None:
    """Under ``accelerate launch`` with DeepSpeed (read from the environment the launcher sets): the settings
    that would be silently overridden or ignored.

    - ``use_cpu: true`` turns DeepSpeed off in accelerate 1.15 (``state.py`` 974: ``... == "true" and not
      cpu``): the run would be plain data-parallel. ``zero3_cpu.yaml`` runs ZeRO-3 without CUDA.
    - ``zero3_init_flag: true``: every stage builds the policy whole and the engine partitions it
      (:func:`pointvl.train.stage_setup.whole_parameters`), so the flag would have no effect.
    - ``gradient_clipping``: one source of truth, the stage's ``max_grad_norm``, which the engine is given
      (:func:`pointvl.train.stage_setup.make_accelerator`); a DeepSpeed config or ``--gradient_clipping`` giving
      another value is refused (``"auto"`` leaves it to the train config).
    """
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() != "true":
        return
    if os.environ.get("ACCELERATE_USE_CPU", "false").lower() in ("1", "true", "yes"):
        raise InputError("the accelerate config says use_cpu: true with DeepSpeed, which accelerate then turns off "
                         "(plain data-parallel, no ZeRO): use pointvl/configs/train/zero3_cpu.yaml (use_cpu: false)")
    if os.environ.get("ACCELERATE_DEEPSPEED_ZERO3_INIT", "false").lower() == "true":
        raise InputError("deepspeed_config.zero3_init_flag: true is not supported: every stage builds the policy "
                         "whole and the engine partitions it; set zero3_init_flag: false")
    clipping: dict[str, Any] = {}
    path = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "none")
    if path != "none":
        if not os.path.isfile(path):
            raise InputError(f"the DeepSpeed config file {path} does not exist (a relative path is read from the "
                             f"working directory {os.getcwd()}: launch from the repository root)")
        clipping[path] = pio.parse_yaml(pio.read_bytes(path)).get("gradient_clipping", "auto")
    if os.environ.get("ACCELERATE_GRADIENT_CLIPPING", "auto") != "auto":
        clipping["--gradient_clipping"] = float(os.environ["ACCELERATE_GRADIENT_CLIPPING"])
    norms = {"sft.max_grad_norm": config.sft.max_grad_norm}
    if config.variant in GRPO_MODES:
        norms["grpo.max_grad_norm"] = config.grpo.max_grad_norm
    for source, value in clipping.items():
        for key, norm in norms.items():
            if value != "auto" and float(value) != norm:
                raise InputError(f"{source} sets DeepSpeed's gradient_clipping to {value} but {key} is {norm}: the "
                                 f"train config clips; set gradient_clipping to \"auto\" there")


def check_weights(config: TrainConfig) -> None:
    """Raise InputError (one line) when the job's weights are not on this machine: the language model's
    checkpoint must be a local folder or in the local Hugging Face cache (runs are offline,
    ``HF_HUB_OFFLINE``), Point-BERT's weights must exist or random weights must be asked for, and the
    rollout engine must be one that is built."""
    m = config.model
    if m.architecture == "checkpoint":
        needed = "config.json" if m.random_init else "model weights"
        local = os.path.isdir(m.checkpoint)
        if local:
            files = set(os.listdir(m.checkpoint))
            weights = {"model.safetensors", "model.safetensors.index.json"} & files
            if "config.json" not in files or (not m.random_init and not weights):
                raise InputError(f"model.checkpoint {m.checkpoint} holds no {needed} (config.json, model.safetensors)")
        elif m.checkpoint.count("/") > 1 or m.checkpoint.startswith((".", "/")):
            raise InputError(f"model.checkpoint {m.checkpoint} is not a folder")
        elif not _hf_cached(m.checkpoint, "config.json") or not m.random_init and not (
            _hf_cached(m.checkpoint, "model.safetensors") or _hf_cached(m.checkpoint, "model.safetensors.index.json")
        ):
            raise InputError(
                f"model.checkpoint {m.checkpoint!r} is neither a local folder nor in the local Hugging Face cache "
                "(runs are offline): download it first or give a folder"
                + ("" if m.random_init else ", or set model.random_init=true for random weights")
            )
    pb = m.point_bert
    if pb.checkpoint is None and not pb.random_init:
        raise InputError(
            "no Point-BERT weights: set model.point_bert.checkpoint=/path/point_bert_v1.2.pt (PointLLM's, xyz + rgb: "
            "model.point_bert.point_dims=6, the paper preset's) or /path/Point-BERT.pth (xyz: point_dims=3), or "
            "model.point_bert.random_init=true to train with a random frozen point encoder"
        )
    if pb.checkpoint is not None:
        if not os.path.isfile(pb.checkpoint):
            raise InputError(f"model.point_bert.checkpoint {pb.checkpoint} does not exist")
        try:  # the layout and the channel count the first layer takes (what load_checkpoint will check)
            check_point_dims(pb.checkpoint, read_checkpoint(pb.checkpoint)[1], pb.point_dims)
        except ValueError as err:
            raise InputError(f"model.point_bert.checkpoint: {err}") from None
    if config.grpo.rollout_engine != "hf" and config.variant in GRPO_MODES:
        raise InputError(
            f"grpo.rollout_engine={config.grpo.rollout_engine!r} is not built (it needs a GPU); use 'hf'"
        )


def check_handoff(handoff: HandoffConfig) -> None:
    """Raise :class:`InputError` (one line, prefixed ``handoff``) when a build's training hand-off could
    not start its training job here (:func:`preflight` of its preset, variant and overrides); a build
    with ``handoff.train`` runs it before any stage, GPU second or API call."""
    try:
        preflight(preset_config(handoff.preset, handoff.variant, handoff.overrides))
    except (TypeError, ValueError) as err:
        raise InputError(f"handoff (preset {handoff.preset!r}): {err}; set handoff.overrides, use handoff.preset "
                         "tiny, or set handoff.train false") from err
