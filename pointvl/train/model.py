"""PointVL-3D: Qwen2.5-VL with Point-BERT point tokens fused with image tokens (paper §3.1, eq. 2-4).

For a prompt (image, point cloud, instruction):

1. Point-BERT (frozen) encodes the cloud into ``P = num_group + 1`` point tokens ``F_p`` (eq. 2's query).
2. Qwen2.5-VL's vision tower encodes the image into image tokens ``F_i`` (frozen by default).
3. Geometry-guided cross-attention (trainable): the point tokens attend to the image tokens,
   ``F = F_p + CrossAttn(LN(F_p), F_i, F_i)`` (eq. 2-3; we read eq. 3 as a residual sum).
4. A linear projector maps ``F`` to the language model's embedding width (eq. 4).
5. The ``P`` projected tokens replace the ``<|point_pad|>`` placeholders of the prompt; the language
   model decodes the rest of the sequence as usual (``generate`` works on these embeddings).

The image therefore reaches the language model through the fused point tokens only (eq. 4 feeds the
projected tokens and the instruction to the decoder); no ``<|image_pad|>`` tokens are in the prompt, so
the language model uses plain 1-D positions.

Precision (``ModelConfig.dtype``): every trainable parameter is float32 (the master weights the
optimizer updates; a bf16 parameter would round a 1e-6 update away), frozen parts (the vision tower)
are stored in bf16, and in ``"bfloat16"`` mode ``forward`` and ``generate`` run under bf16 autocast,
wherever the model runs (one process, DDP, FSDP, the Prefect GPU worker). The frozen Point-BERT computes
in float32 in every mode, its FPS/kNN included (autocast off inside; an engine that casts its weights to
bf16 changes their storage, not its arithmetic: :mod:`pointvl.train.point_bert`).
"""

from __future__ import annotations

import copy
import logging
import os
from typing import Any

import torch
from torch import nn

from pointvl.core.extras import require
from pointvl.train.generation import dropped_settings, token_config
from pointvl.train.point_bert import PointBERT
from pointvl.train.tokenizer import POINT_TOKENS, build_char_tokenizer
from pointvl.train.train_config import ModelConfig

logger = logging.getLogger(__name__)

POINT_START, POINT_END, POINT_PAD = POINT_TOKENS
SYSTEM_PROMPT = "You are a helpful assistant."


def _transformers():
    return require("transformers", extra="train", purpose="the PointVL-3D model")


class PointVL3D(nn.Module):
    """The hybrid point-image policy. Components are built by :func:`build_model`."""

    def __init__(
        self, lm: nn.Module, point_encoder: PointBERT, point_token_ids: list[int], config: ModelConfig
    ) -> None:
        super().__init__()
        self.config = config
        self.lm = lm
        self.point_encoder = point_encoder.requires_grad_(False).eval()
        self.point_token_ids = point_token_ids  # start, end, pad
        self.point_token_id = point_token_ids[2]
        hidden = lm.config.text_config.hidden_size
        dim = point_encoder.config.trans_dim
        self.cross_norm = nn.LayerNorm(dim)
        self.cross_attn = nn.MultiheadAttention(
            dim, config.cross_attn_heads, kdim=hidden, vdim=hidden, batch_first=True
        )
        self.projector = nn.Linear(dim, hidden)
        if config.freeze_vision:
            self.lm.model.visual.requires_grad_(False)

    @property
    def num_point_tokens(self) -> int:
        return self.point_encoder.num_tokens

    def autocast(self, device: torch.device) -> torch.autocast:
        """bf16 autocast in ``"bfloat16"`` mode (a no-op context in ``"float32"``)."""
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.config.dtype == "bfloat16")

    def train(self, mode: bool = True) -> PointVL3D:
        super().train(mode)
        self.point_encoder.eval()  # frozen: BatchNorm keeps its statistics
        return self

    def point_tokens(
        self, points: torch.Tensor, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor
    ) -> torch.Tensor:
        """Projected fused tokens (B, P, hidden) for clouds (B, N, 3 | 6) and their B images."""
        with torch.no_grad():  # float32 inside, whatever the engine or autocast (pointvl.train.point_bert)
            f_p = self.point_encoder(points.float())
        f_p = f_p.to(self.projector.weight.dtype)
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.config.freeze_vision):
            images = self.lm.model.get_image_features(pixel_values, image_grid_thw).pooler_output
        f_i = nn.utils.rnn.pad_sequence(list(images), batch_first=True).to(f_p.dtype)
        lengths = torch.tensor([len(x) for x in images], device=f_i.device)
        pad = torch.arange(f_i.shape[1], device=f_i.device)[None] >= lengths[:, None]
        fused, _ = self.cross_attn(self.cross_norm(f_p), f_i, f_i, key_padding_mask=pad, need_weights=False)
        return self.projector(f_p + fused)

    def embed(
        self,
        input_ids: torch.Tensor,
        points: torch.Tensor,
        pixel_values: torch.Tensor,
        image_grid_thw: torch.Tensor,
    ) -> torch.Tensor:
        """Token embeddings of ``input_ids`` with the point tokens placed at the ``<|point_pad|>`` slots."""
        embeds = self.lm.get_input_embeddings()(input_ids)
        slots = input_ids == self.point_token_id
        counts = slots.sum(dim=1)
        if not torch.all(counts == self.num_point_tokens):
            raise ValueError(
                f"each prompt needs exactly {self.num_point_tokens} {POINT_PAD} tokens, got {counts.tolist()}; "
                "build prompts with pointvl.train.model.build_prompt"
            )
        tokens = self.point_tokens(points, pixel_values, image_grid_thw).to(embeds.dtype)
        return embeds.masked_scatter(slots[..., None], tokens)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        points: torch.Tensor,
        pixel_values: torch.Tensor,
        image_grid_thw: torch.Tensor,
        labels: torch.Tensor | None = None,
        logits_to_keep: int = 0,
        logps_of: torch.Tensor | None = None,
        logps_chunk: int = 256,
        logps_temperature: float = 1.0,
    ) -> Any:
        """The language model's output; with ``logps_of`` (B, T), the log-probabilities (B, T) of those
        tokens as the last T tokens of ``input_ids`` instead (:func:`selective_logps`: no (B, T, vocab)
        float32 tensor is made) under the distribution :meth:`generate` samples from at ``logps_temperature``
        (logits divided by it, the point tokens suppressed). Both run through ``forward``, so DDP/FSDP hooks
        see them."""
        # positions from this batch's mask, not the rope deltas a previous generate cached (another batch size)
        self.lm.model.rope_deltas = None
        with self.autocast(input_ids.device):
            embeds = self.embed(input_ids, points, pixel_values, image_grid_thw)
            if logps_of is None:
                return self.lm(
                    inputs_embeds=embeds, attention_mask=attention_mask, labels=labels, logits_to_keep=logits_to_keep
                )
            t = logps_of.shape[1]
            hidden = self.lm.model(inputs_embeds=embeds, attention_mask=attention_mask).last_hidden_state
            return selective_logps(self.lm.lm_head, hidden[:, -t - 1 : -1], logps_of, logps_chunk, logps_temperature,
                                   tuple(self.point_token_ids))

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        points: torch.Tensor,
        pixel_values: torch.Tensor,
        image_grid_thw: torch.Tensor,
        generation_config: Any,
    ) -> torch.Tensor:
        """Generated token ids only (the prompt is not repeated), decoded with ``generation_config`` (a
        ``transformers.GenerationConfig`` from :mod:`pointvl.train.generation`: every sampling setting explicit).

        The point placeholder tokens are suppressed: the policy never writes them.
        """
        config = copy.deepcopy(generation_config)
        config.suppress_tokens = list(self.point_token_ids)
        with self.autocast(input_ids.device):
            embeds = self.embed(input_ids, points, pixel_values, image_grid_thw)
            return self.lm.generate(inputs_embeds=embeds, attention_mask=attention_mask, generation_config=config)


def _chunk_logps(
    head: nn.Module, hidden: torch.Tensor, ids: torch.Tensor, temperature: float, suppressed: tuple[int, ...]
) -> torch.Tensor:
    # in place: one chunk x vocab float32 tensor (neither op's backward needs the values it overwrites)
    logits = head(hidden).float().div_(temperature)
    if suppressed:
        logits.index_fill_(-1, torch.tensor(suppressed, device=logits.device), float("-inf"))
    return logits.gather(-1, ids[:, None]).squeeze(-1) - logits.logsumexp(-1)


def selective_logps(
    head: nn.Module, hidden: torch.Tensor, ids: torch.Tensor, chunk: int, temperature: float = 1.0,
    suppressed: tuple[int, ...] = (),
) -> torch.Tensor:
    """``log_softmax(head(hidden) / temperature)`` at ``ids`` (B, T), ``chunk`` tokens at a time; each chunk's
    logits are recomputed in backward (activation checkpointing), so at most ``chunk x vocab`` float32 logits exist.

    ``temperature``: the log-probabilities of the distribution ``generate`` samples at that temperature (its
    ``TemperatureLogitsWarper`` divides the logits); TRL 1.16 does the same (``trl/trainer/utils.py`` line 703).
    ``suppressed``: token ids ``generate`` never picks (its ``SuppressTokensLogitsProcessor`` sets their logits
    to -inf), left out of the normalisation likewise.
    """
    from torch.utils.checkpoint import checkpoint

    flat_h, flat_ids = hidden.reshape(-1, hidden.shape[-1]), ids.reshape(-1)
    parts = [
        checkpoint(_chunk_logps, head, flat_h[i : i + chunk], flat_ids[i : i + chunk], temperature, suppressed,
                   use_reentrant=False)
        for i in range(0, len(flat_ids), chunk)
    ]
    return torch.cat(parts).reshape(ids.shape)


def build_prompt(instruction: str, num_point_tokens: int) -> str:
    """The chat-formatted prompt (Qwen's ``<|im_start|>`` template) with the point placeholders."""
    points = POINT_START + POINT_PAD * num_point_tokens + POINT_END
    return (
        f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>\n"
        f"<|im_start|>user\n{points}{instruction}<|im_end|>\n<|im_start|>assistant\n"
    )


def tiny_qwen_config(vocab_size: int, special_ids: dict[str, int], text_ids: dict[str, int]):
    """A ~0.5M-parameter Qwen2.5-VL config (``docs/facts.md#training``: mrope sections sum to head_dim / 2, ...)."""
    tf = _transformers()
    return tf.Qwen2_5_VLConfig(
        text_config={
            "vocab_size": vocab_size, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 2048,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
            "tie_word_embeddings": True, **text_ids,
        },
        vision_config={
            "depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "out_hidden_size": 64,
            "fullatt_block_indexes": [1], "window_size": 56, "patch_size": 14, "spatial_merge_size": 2,
            "temporal_patch_size": 2, "in_channels": 3,
        },
        **special_ids,
    )


def qwen25_vl_3b_config(vocab_size: int, special_ids: dict[str, int], text_ids: dict[str, int]):
    """Qwen2.5-VL-3B-Instruct's shapes (its config.json), for random-weight benchmarks without downloads."""
    tf = _transformers()
    return tf.Qwen2_5_VLConfig(
        text_config={
            "vocab_size": max(vocab_size, 151936), "hidden_size": 2048, "intermediate_size": 11008,
            "num_hidden_layers": 36, "num_attention_heads": 16, "num_key_value_heads": 2,
            "max_position_embeddings": 128000,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
            "tie_word_embeddings": True, "rms_norm_eps": 1e-6, **text_ids,
        },
        vision_config={
            "depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16, "out_hidden_size": 2048,
            "fullatt_block_indexes": [7, 15, 23, 31], "window_size": 112, "patch_size": 14,
            "spatial_merge_size": 2, "temporal_patch_size": 2, "in_channels": 3,
        },
        **special_ids,
    )


def build_tokenizer(config: ModelConfig):
    """The checkpoint's tokenizer with the point tokens added, or the in-code character tokenizer."""
    if config.architecture != "checkpoint":
        return build_char_tokenizer()
    tok = _transformers().AutoTokenizer.from_pretrained(config.checkpoint)
    tok.add_special_tokens({"additional_special_tokens": list(POINT_TOKENS)}, replace_extra_special_tokens=False)
    return tok


def build_image_processor(config: ModelConfig):
    """Qwen2-VL's image processor fixed to ``image_size`` x ``image_size`` (patch 14, merge 2)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    pixels = config.image_size**2
    return Qwen2VLImageProcessorPil(min_pixels=pixels, max_pixels=pixels, patch_size=14, merge_size=2,
                                    temporal_patch_size=2)


def build_model(config: ModelConfig, tokenizer) -> PointVL3D:
    """The policy for ``config`` (weights from the checkpoint unless random; Point-BERT from its path).

    The language model and the fusion modules are float32 (master weights); in ``"bfloat16"`` mode the
    frozen vision tower is stored in bf16.
    """
    tf = _transformers()
    ids = tokenizer.convert_tokens_to_ids
    special = {"image_token_id": ids("<|image_pad|>"), "video_token_id": ids("<|video_pad|>"),
               "vision_start_token_id": ids("<|vision_start|>"), "vision_end_token_id": ids("<|vision_end|>")}
    eos = ids("<|im_end|>")
    text_ids = {"bos_token_id": eos, "eos_token_id": eos, "pad_token_id": tokenizer.pad_token_id}
    if config.architecture == "checkpoint" and not config.random_init:
        lm = tf.Qwen2_5_VLForConditionalGeneration.from_pretrained(config.checkpoint, dtype=torch.float32)
    else:
        if config.architecture == "checkpoint":
            qcfg = tf.AutoConfig.from_pretrained(config.checkpoint)
        elif config.architecture == "tiny":
            qcfg = tiny_qwen_config(len(tokenizer), special, text_ids)
        else:
            qcfg = qwen25_vl_3b_config(len(tokenizer), special, text_ids)
        lm = tf.Qwen2_5_VLForConditionalGeneration._from_config(qcfg, dtype=torch.float32)
    if len(tokenizer) > lm.get_input_embeddings().num_embeddings:
        lm.resize_token_embeddings(len(tokenizer))
    dropped = dropped_settings(lm.generation_config)
    if dropped:
        logger.info("dropping the checkpoint's generation settings %s: rollouts and predict set their own", dropped)
    lm.generation_config = token_config(tokenizer)  # pointvl.train.generation: no inherited sampling settings
    point_encoder = PointBERT(config.point_bert)
    if config.point_bert.checkpoint:
        point_encoder.load_checkpoint(config.point_bert.checkpoint)
    model = PointVL3D(lm, point_encoder, [ids(t) for t in POINT_TOKENS], config)
    # frozen: no master copy needed; not under FSDP, which all-gathers one dtype per shard unit
    if config.dtype == "bfloat16" and config.freeze_vision and os.environ.get("ACCELERATE_USE_FSDP") != "true":
        lm.model.visual.to(torch.bfloat16)
    if config.gradient_checkpointing:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    logger.info("PointVL-3D (%s): %d trainable parameters, %d point tokens",
                config.architecture, n_train, model.num_point_tokens)
    return model


