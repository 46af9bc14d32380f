"""Tiny randomly initialised diffusers pipelines, built in code, for CPU tests and benchmarks.

They are the real ``QwenImageEditPipeline`` and ``FluxControlNetPipeline`` classes with a few
thousand parameters each and no text encoders (``text_encoder=None``, see ``notes/FACTS.md``): the
prompt goes in as embeddings made by :class:`HashPromptEncoder`, a stand-in for the text encoder that
maps each prompt string to a fixed random tensor. Nothing is downloaded.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch

QWEN_JOINT_DIM = 16
FLUX_JOINT_DIM = 32
FLUX_POOLED_DIM = 32


class HashPromptEncoder:
    """Prompt strings -> deterministic random embeddings, in the keyword names the pipeline takes.

    ``kind="refine"`` gives ``prompt_embeds`` + ``prompt_embeds_mask`` (Qwen-Image-Edit);
    ``kind="synthesize"`` gives ``prompt_embeds`` + ``pooled_prompt_embeds`` (FLUX).
    """

    def __init__(self, kind: str, seq_len: int = 8, joint_dim: int | None = None, pooled_dim: int | None = None,
                 device: str = "cpu", dtype: torch.dtype = torch.float32) -> None:
        if kind not in ("refine", "synthesize"):
            raise ValueError(f"kind must be 'refine' or 'synthesize', got {kind!r}")
        self.kind = kind
        self.seq_len = seq_len
        self.joint_dim = joint_dim or (QWEN_JOINT_DIM if kind == "refine" else FLUX_JOINT_DIM)
        self.pooled_dim = pooled_dim or FLUX_POOLED_DIM
        self.device = device
        self.dtype = dtype

    def _one(self, text: str, shape: tuple[int, ...]) -> torch.Tensor:
        seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") & (2**63 - 1)
        g = torch.Generator("cpu").manual_seed(seed)
        return torch.randn(shape, generator=g)

    def __call__(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        embeds = torch.stack([self._one(p, (self.seq_len, self.joint_dim)) for p in prompts])
        out = {"prompt_embeds": embeds.to(self.device, self.dtype)}
        if self.kind == "refine":
            out["prompt_embeds_mask"] = torch.ones(len(prompts), self.seq_len, dtype=torch.long, device=self.device)
        else:
            pooled = torch.stack([self._one("pooled:" + p, (self.pooled_dim,)) for p in prompts])
            out["pooled_prompt_embeds"] = pooled.to(self.device, self.dtype)
        return out


def tiny_refine_pipeline(seed: int = 0, plus: bool = False) -> Any:
    """A ``QwenImageEditPipeline`` (``plus``: ``QwenImageEditPlusPipeline``, the -2509/-2511 class) with a
    2-layer transformer and a 4-channel VAE (scale factor 4)."""
    from diffusers import (
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        QwenImageEditPipeline,
        QwenImageEditPlusPipeline,
        QwenImageTransformer2DModel,
    )

    torch.manual_seed(seed)
    z = 4
    transformer = QwenImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16,
        num_attention_heads=3, joint_attention_dim=QWEN_JOINT_DIM, guidance_embeds=False,
        axes_dims_rope=(8, 4, 4),
    )
    vae = AutoencoderKLQwenImage(
        base_dim=z * 6, z_dim=z, dim_mult=[1, 2, 4], num_res_blocks=1, temperal_downsample=[False, True],
        latents_mean=[0.0] * z, latents_std=[1.0] * z,
    )
    pipe = (QwenImageEditPlusPipeline if plus else QwenImageEditPipeline)(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=None, tokenizer=None,
        processor=None, transformer=transformer,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_flux_parts(seed: int = 0, union: bool = True) -> tuple[Any, Any]:
    """``(FluxPipeline without text encoders, FluxControlNetModel)``: Union-Pro style with 10 modes, or
    (``union=False``) without modes, as ControlNet-Union-Pro-2.0."""
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        FluxControlNetModel,
        FluxPipeline,
        FluxTransformer2DModel,
    )

    torch.manual_seed(seed)
    common = dict(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=FLUX_JOINT_DIM, pooled_projection_dim=FLUX_POOLED_DIM,
        axes_dims_rope=[4, 4, 8], guidance_embeds=True,
    )
    transformer = FluxTransformer2DModel(**common)
    controlnet = FluxControlNetModel(**common, num_mode=10 if union else None)
    vae = AutoencoderKL(
        sample_size=32, in_channels=3, out_channels=3, block_out_channels=(4,), layers_per_block=1,
        latent_channels=4, norm_num_groups=1, use_quant_conv=False, use_post_quant_conv=False,
        shift_factor=0.0609, scaling_factor=1.5035,
    )
    base = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=None, tokenizer=None,
        text_encoder_2=None, tokenizer_2=None, transformer=transformer,
    )
    return base, controlnet


def tiny_synthesize_pipeline(seed: int = 0, union: bool = True) -> Any:
    """A ``FluxControlNetPipeline`` (1+1 layers) with the ControlNet (:func:`tiny_flux_parts`) in a
    ``FluxMultiControlNetModel``."""
    from diffusers import FluxControlNetPipeline, FluxMultiControlNetModel

    base, controlnet = tiny_flux_parts(seed, union)
    pipe = FluxControlNetPipeline(
        scheduler=base.scheduler, vae=base.vae, text_encoder=None, tokenizer=None, text_encoder_2=None,
        tokenizer_2=None, transformer=base.transformer, controlnet=FluxMultiControlNetModel([controlnet]),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_tiny_models(folder: str, seed: int = 0, plus: bool = False, union: bool = True) -> dict[str, str]:
    """Save the tiny models as local model folders, laid out like the Hub repos the configs name
    (``plus``: an Edit-Plus refine checkpoint; ``union=False``: a ControlNet without modes).

    Returns ``{"refine": ..., "synthesize": ..., "controlnet": ...}`` folder paths.
    """
    paths = {k: f"{folder.rstrip('/')}/{k}" for k in ("refine", "synthesize", "controlnet")}
    tiny_refine_pipeline(seed, plus).save_pretrained(paths["refine"])
    base, controlnet = tiny_flux_parts(seed, union)
    base.save_pretrained(paths["synthesize"])
    controlnet.save_pretrained(paths["controlnet"])
    return paths
