"""Weight memory of the real GPU-stage models per offload option, **computed** from parameter counts.

``python -m benchmarks.bench_gpu_memory`` builds every component of Qwen-Image-Edit and of FLUX.1-Krea-dev +
ControlNet-Union-Pro on the meta device (no weights, no download) from the configs below, counts its
parameters, and prints what each offload option keeps on the device in bf16
(:class:`pointvl.dataset.gpu_memory.MemoryPlan`) as the README's markdown table. Computed, not
measured: activations, the VAE decode and the CUDA context come on top (``memory_margin_gb``).

Configs: the diffusers classes' defaults are Qwen-Image's 20B transformer and VAE and FLUX.1's 12B
transformer; Qwen2.5-VL-7B-Instruct, CLIP ViT-L/14's text tower and T5-v1.1-XXL's encoder are their
published configs; ControlNet-Union-Pro is taken to have InstantX Union's layout (5 double + 10 single
blocks, 10 modes; its 6.6 GB bf16 file agrees), Union-Pro-2.0 6 double + 0 single blocks and no modes.
"""

from __future__ import annotations

import json
from typing import Any

from pointvl.dataset.gpu_memory import GB, Component, MemoryPlan

FLUX_VAE = {
    "in_channels": 3, "out_channels": 3, "latent_channels": 16, "block_out_channels": (128, 256, 512, 512),
    "down_block_types": ("DownEncoderBlock2D",) * 4, "up_block_types": ("UpDecoderBlock2D",) * 4,
    "layers_per_block": 2, "norm_num_groups": 32, "use_quant_conv": False, "use_post_quant_conv": False,
}
UNION_PRO = {"num_layers": 5, "num_single_layers": 10, "num_mode": 10, "guidance_embeds": True}
UNION_PRO_2 = {"num_layers": 6, "num_single_layers": 0, "num_mode": None, "guidance_embeds": True}
QWEN25_VL_7B = {
    "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28,
    "num_key_value_heads": 4, "vocab_size": 152064, "tie_word_embeddings": False,
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
    "vision_config": {"depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16,
                      "out_hidden_size": 3584, "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2,
                      "window_size": 112, "fullatt_block_indexes": [7, 15, 23, 31]},
}
T5_XXL = {"d_model": 4096, "d_ff": 10240, "d_kv": 64, "num_heads": 64, "num_layers": 24, "vocab_size": 32128,
          "feed_forward_proj": "gated-gelu", "is_encoder_decoder": False}
CLIP_L_TEXT = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
               "vocab_size": 49408, "max_position_embeddings": 77, "projection_dim": 768}


def _meta(build: Any) -> Any:
    import torch

    with torch.device("meta"):
        return build()


def component(name: str, model: Any, in_chain: bool = True, dtype_bytes: int = 2) -> Component:
    """Bytes of ``model``'s parameters at ``dtype_bytes`` each, and of its largest module's own ones."""
    total = sum(p.numel() for p in model.parameters())
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    return Component(name, total * dtype_bytes, largest * dtype_bytes, in_chain)


def plans() -> dict[str, MemoryPlan]:
    from diffusers import (
        AutoencoderKL,
        AutoencoderKLQwenImage,
        FluxControlNetModel,
        FluxTransformer2DModel,
        QwenImageTransformer2DModel,
    )
    from transformers import (
        CLIPTextConfig,
        CLIPTextModel,
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        T5Config,
        T5EncoderModel,
    )

    qwen = (
        component("text_encoder", _meta(lambda: Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**QWEN25_VL_7B)))),
        component("transformer", _meta(QwenImageTransformer2DModel)),
        component("vae", _meta(AutoencoderKLQwenImage)),
    )
    flux = (
        component("text_encoder", _meta(lambda: CLIPTextModel(CLIPTextConfig(**CLIP_L_TEXT)))),
        component("text_encoder_2", _meta(lambda: T5EncoderModel(T5Config(**T5_XXL)))),
        component("transformer", _meta(lambda: FluxTransformer2DModel(guidance_embeds=True))),
        component("vae", _meta(lambda: AutoencoderKL(**FLUX_VAE))),
    )
    return {
        "refine: Qwen-Image-Edit": MemoryPlan("refine", "bfloat16", qwen),
        "synthesize: FLUX.1-Krea-dev + T5 + ControlNet-Union-Pro": MemoryPlan("synthesize", "bfloat16", (
            *flux, component("controlnet", _meta(lambda: FluxControlNetModel(**UNION_PRO)), in_chain=False))),
        "synthesize with ControlNet-Union-Pro-2.0": MemoryPlan("synthesize", "bfloat16", (
            *flux, component("controlnet", _meta(lambda: FluxControlNetModel(**UNION_PRO_2)), in_chain=False))),
    }


def run() -> dict[str, dict]:
    out = {}
    for name, plan in plans().items():
        out[name] = {"components_gb": {c.name: round(c.bytes / GB, 2) for c in plan.components},
                     "params_b": round(sum(c.bytes for c in plan.components) / 2 / 1e9, 2),
                     "weights_gb": plan.table()}
    return out


def markdown(result: dict[str, dict]) -> str:
    lines = ["| stage (bf16) | parameters | offload: none | model | sequential |", "|---|---|---|---|---|"]
    for name, r in result.items():
        w = r["weights_gb"]
        parts = ", ".join(f"{k} {v:g}" for k, v in r["components_gb"].items())
        lines.append(f"| {name} ({parts} GB) | {r['params_b']:g} B | {w['none']:g} GB | {w['model']:g} GB | "
                     f"{w['sequential']:g} GB |")
    return "\n".join(lines)


if __name__ == "__main__":
    result = run()
    print(json.dumps(result, indent=1))
    print(markdown(result))
