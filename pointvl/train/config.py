"""Configs of the training flow: the model, SFT, routed GRPO, and the presets (paper §4.2).

Defaults are the paper's where it states them (§4.2: Qwen2.5-VL-3B-Instruct, Point-BERT frozen with
trainable cross-attention, SFT 2 epochs at batch 128 with AdamW and a cosine schedule, RL 1 epoch with
group size 8, λ = 0.15). The paper's learning rates, point count and image size did not survive in
its text; the values here are ours and say so.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field

from pointvl.geometry import QuantConfig
from pointvl.grca import GRCAConfig
from pointvl.train.point_bert import PointBertConfig

logger = logging.getLogger(__name__)

ARCHITECTURES = ("checkpoint", "tiny", "3b")
VARIANTS = ("sft", "sft_budget_matched", "broadcast", "grca", "grca_rpc")
"""The rows of the paper's Table 3: SFT alone, SFT continued for the RL budget, GRPO with one broadcast
reward, GRCA without RPC, GRCA + RPC."""


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
        dtype: ``"bfloat16"`` or ``"float32"`` for the language model.
        quant: the coordinate bins of the output (DESIGN.md).
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
        if isinstance(self.point_bert, dict):
            self.point_bert = PointBertConfig(**self.point_bert)
        if isinstance(self.quant, dict):
            self.quant = QuantConfig(**self.quant)
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
class SFTConfig:
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
        max_steps: stop after this many optimizer steps (None: all epochs); for demos and budgets.
        seed: data order and initialisation seed.
    """

    epochs: float = 2.0
    batch_size: int = 128
    per_device_batch_size: int = 4
    learning_rate: float = 1e-5
    min_lr_ratio: float = 0.1
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    max_steps: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.batch_size % self.per_device_batch_size:
            raise ValueError(
                f"SFTConfig.batch_size ({self.batch_size}) must be a multiple of per_device_batch_size "
                f"({self.per_device_batch_size})"
            )
        if not (self.epochs > 0 and self.learning_rate > 0 and 0 <= self.min_lr_ratio <= 1):
            raise ValueError("SFTConfig needs epochs > 0, learning_rate > 0 and min_lr_ratio in [0, 1]")


@dataclass
class GRPOTrainConfig:
    """Stage 2, routed GRPO (§3.3-3.5, §4.2).

    Attributes:
        mode: ``"broadcast"`` (vanilla GRPO), ``"grca"`` or ``"grca_rpc"`` (the paper's method).
        lam: λ, weight of the standardised RPC advantage on background tokens (0.15).
        num_generations: group size G (8).
        epochs: passes over the train split (1).
        prompts_per_step: prompts per optimizer step per process (each gives G samples) (1).
        learning_rate: AdamW learning rate (1e-6; the paper's value is lost).
        clip_eps: PPO clipping ε (0.2).
        beta: KL weight to the reference policy (0: no reference model).
        temperature, top_p: sampling of the rollouts (1.0, 1.0).
        max_new_tokens: generation budget per sample (1024; the canonical output is ~600 tokens).
        max_grad_norm: gradient clipping (1.0).
        max_steps: stop after this many optimizer steps (None: one pass).
        grca: span/background/bin options of the scoring (:class:`pointvl.grca.GRCAConfig`).
        seed: sampling seed.
    """

    mode: str = "grca_rpc"
    lam: float = 0.15
    num_generations: int = 8
    epochs: float = 1.0
    prompts_per_step: int = 1
    learning_rate: float = 1e-6
    clip_eps: float = 0.2
    beta: float = 0.0
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 1024
    max_grad_norm: float = 1.0
    max_steps: int | None = None
    grca: GRCAConfig = field(default_factory=GRCAConfig)
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.grca, dict):
            quant = self.grca.get("quant", {})
            self.grca = GRCAConfig(**{**self.grca, "quant": QuantConfig(**quant) if isinstance(quant, dict) else quant})
        if self.mode not in ("broadcast", "grca", "grca_rpc"):
            raise ValueError(f"GRPOTrainConfig.mode must be broadcast, grca or grca_rpc, got {self.mode!r}")
        if self.num_generations < 2:
            raise ValueError("GRPOTrainConfig.num_generations must be >= 2 (group standardisation; paper: 8)")
        if self.beta > 0:
            raise ValueError("GRPOTrainConfig.beta > 0 needs a reference model, which is not implemented; use 0")


@dataclass
class TrainConfig:
    """One run of the training flow: which Table 3 variant, on which model, with which stage configs.

    Attributes:
        variant: one of :data:`VARIANTS`; ``sft`` stops after SFT, ``sft_budget_matched`` continues SFT
            for the RL stage's number of passes, the others run GRPO in that mode after SFT.
        model, sft, grpo: the component configs.
        eval_max_new_tokens: generation budget of ``predict`` (1024).
    """

    variant: str = "grca_rpc"
    model: ModelConfig = field(default_factory=ModelConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    grpo: GRPOTrainConfig = field(default_factory=GRPOTrainConfig)
    eval_max_new_tokens: int = 1024

    def __post_init__(self) -> None:
        for name, cls in (("model", ModelConfig), ("sft", SFTConfig), ("grpo", GRPOTrainConfig)):
            if isinstance(getattr(self, name), dict):
                setattr(self, name, cls(**getattr(self, name)))
        if self.variant not in VARIANTS:
            raise ValueError(f"TrainConfig.variant must be one of {VARIANTS}, got {self.variant!r}")
        if self.variant in ("broadcast", "grca", "grca_rpc") and self.grpo.mode != self.variant:
            raise ValueError(f"variant {self.variant!r} runs GRPO in that mode: set grpo.mode={self.variant!r}")
        if self.grpo.grca.quant != self.model.quant:
            raise ValueError("grpo.grca.quant must equal model.quant: rewards must read the bins the model writes")

    def to_dict(self) -> dict:
        return asdict(self)


def paper_preset(variant: str = "grca_rpc") -> TrainConfig:
    """The paper's setup (§4.2) for one Table 3 row."""
    mode = variant if variant in ("broadcast", "grca", "grca_rpc") else "grca_rpc"
    return TrainConfig(variant=variant, grpo=GRPOTrainConfig(mode=mode))


def tiny_preset(variant: str = "grca_rpc") -> TrainConfig:
    """A CPU-sized run of the same flow: tiny random model, short schedules (``make train-demo``)."""
    mode = variant if variant in ("broadcast", "grca", "grca_rpc") else "grca_rpc"
    return TrainConfig(
        variant=variant,
        model=ModelConfig(
            architecture="tiny",
            point_bert=PointBertConfig(trans_dim=32, depth=2, num_heads=2, num_group=16, group_size=16,
                                       encoder_dims=64),
            num_points=256,
            image_size=56,
            cross_attn_heads=2,
            gradient_checkpointing=False,
            dtype="float32",
        ),
        # 600 steps: enough for the tiny model to write parseable JSON on the demo's shards (~3 min here)
        sft=SFTConfig(epochs=100, batch_size=4, per_device_batch_size=4, learning_rate=3e-3, warmup_ratio=0.05,
                      max_steps=600),
        grpo=GRPOTrainConfig(mode=mode, num_generations=4, learning_rate=1e-4, max_new_tokens=700, max_steps=4),
        eval_max_new_tokens=700,
    )


def preset_config(preset: str, variant: str, overrides: dict | None) -> TrainConfig:
    """The preset for ``variant`` with ``overrides`` merged one level deep."""
    presets = {"paper": paper_preset, "tiny": tiny_preset}
    if preset not in presets:
        raise ValueError(f"preset must be one of {sorted(presets)}, got {preset!r}")
    base = presets[preset](variant).to_dict()
    for key, value in (overrides or {}).items():
        base[key] = {**base[key], **value} if isinstance(value, dict) and isinstance(base.get(key), dict) else value
    return TrainConfig(**base)
