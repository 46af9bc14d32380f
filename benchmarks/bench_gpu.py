"""Benchmarks of the GPU stages. ``python -m benchmarks.bench_gpu`` prints ``run()``'s dict as JSON.

- Always (CPU): per-item overhead outside the model call (decode, control images, seeds, drift,
  atomic item writes, shard assembly) with the tiny pipelines of :mod:`pointvl.testing.tiny_pipelines` through the
  real stage code: ``(stage seconds - pipeline seconds) / items``, in ms.
- With CUDA: images/s per stage at the paper's settings with the real model classes at full size
  and random bf16 weights (Qwen-Image-Edit 20B transformer + its VAE, 1024², 50 steps, true CFG 4;
  FLUX.1 12B transformer + Union-Pro ControlNet + VAE, 1024², 28 steps, depth + canny, control
  until 80%), and the GPU memory peak. Text encoders are left out (random prompt embeddings of
  the real shapes), so the numbers cover the transformer, ControlNet and VAE. Each stage is timed
  at two step counts; ``t(S) = a + b*S`` gives the time at the paper's step count.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa

from pointvl.core import images, io
from pointvl.dataset.run_folder import RunFolder

logger = logging.getLogger(__name__)

QWEN_EDIT = {}  # QwenImageTransformer2DModel defaults are Qwen-Image(-Edit)'s 20B configuration
FLUX_DEV = {"guidance_embeds": True}  # FluxTransformer2DModel defaults + guidance: FLUX.1-dev / Krea-dev
UNION_PRO = {"num_layers": 6, "num_single_layers": 0, "num_mode": 10, "guidance_embeds": True}
FLUX_VAE = {
    "in_channels": 3, "out_channels": 3, "latent_channels": 16, "block_out_channels": (128, 256, 512, 512),
    "down_block_types": ("DownEncoderBlock2D",) * 4, "up_block_types": ("UpDecoderBlock2D",) * 4,
    "layers_per_block": 2, "norm_num_groups": 32, "sample_size": 1024, "scaling_factor": 0.3611,
    "shift_factor": 0.1159, "use_quant_conv": False, "use_post_quant_conv": False,
}


@contextlib.contextmanager
def small_qwen_condition(side: int = 32) -> Iterator[None]:
    """Qwen-Image-Edit resizes its conditioning image to ~1 MP; shrink that for CPU runs (FACTS)."""
    import diffusers.pipelines.qwenimage.pipeline_qwenimage_edit as qe

    original = qe.calculate_dimensions
    qe.calculate_dimensions = lambda area, ratio: (side, side, None)
    try:
        yield
    finally:
        qe.calculate_dimensions = original


def _disk_run(run_dir: str, n: int, side: int) -> None:
    yy, xx = np.mgrid[0:side, 0:side] + 0.5
    rows = []
    for k in range(n):
        d2 = ((xx - side * (0.4 + 0.02 * k)) ** 2 + (yy - side / 2) ** 2) / (side * 0.3) ** 2
        mask = d2 <= 1
        rgb = np.full((side, side, 3), 230, np.uint8)
        rgb[mask] = (40 * k % 200, 120, 200)
        depth = np.where(mask, 2.0 - 0.3 * np.sqrt(np.clip(1 - d2, 0, 1)), 0.0)
        rows.append({
            "instance_id": f"03001627-bench{k:04d}-0", "synset_id": "03001627", "category": "chair",
            "render": images.encode_rgb(rgb), "depth": images.encode_depth(depth, 1000.0),
            "mask": images.encode_mask(mask), "depth_scale": 1000.0,
        })
    io.write_table(RunFolder.of(run_dir).stage_table("render", 0), pa.Table.from_pylist(rows))


def cpu_overhead(n: int = 8, side: int = 64, steps: int = 2) -> dict[str, float]:
    """Per-item ms outside the pipeline call, for both stages, plus the passthrough ms per item."""
    from pointvl.dataset.stages.refine import Refine, RefineConfig
    from pointvl.dataset.stages.synthesize import Synthesize, SynthesizeConfig
    from pointvl.testing.tiny_pipelines import HashPromptEncoder, tiny_refine_pipeline, tiny_synthesize_pipeline

    out: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp, small_qwen_condition():
        _disk_run(f"{tmp}/tiny", n, side)
        _disk_run(f"{tmp}/pass", n, side)
        refine = Refine(RefineConfig(backend="diffusers", device="cpu", num_inference_steps=steps),
                        tiny_refine_pipeline(), HashPromptEncoder("refine"))
        synth = Synthesize(SynthesizeConfig(backend="diffusers", device="cpu", num_inference_steps=steps),
                           tiny_synthesize_pipeline(), HashPromptEncoder("synthesize"))
        for name, stage in (("refine", refine), ("synthesize", synth)):
            stats = stage.run_shard(f"{tmp}/tiny", 0)
            out[f"{name}_cpu_overhead_ms_per_item"] = 1000 * (stats["seconds"] - stats["model_seconds"]) / n
            out[f"{name}_cpu_tiny_model_ms_per_item"] = 1000 * stats["model_seconds"] / n
        for name, stage in (("refine", Refine(RefineConfig(backend="passthrough"))),
                            ("synthesize", Synthesize(SynthesizeConfig(backend="passthrough")))):
            stats = stage.run_shard(f"{tmp}/pass", 0)
            out[f"{name}_passthrough_ms_per_item"] = 1000 * stats["seconds"] / n
    return {k: round(v, 3) for k, v in out.items()}


def random_model(cls: type, config: dict, device: str, dtype: Any) -> Any:
    """``cls(**config)`` with random normal(0, 0.02) weights made directly on ``device`` in ``dtype``.

    Built on the meta device first, so a 20B model never exists in float32 anywhere.
    """
    import torch
    from accelerate import init_empty_weights
    from accelerate.utils import set_module_tensor_to_device

    with init_empty_weights(include_buffers=False):
        model = cls(**config)
    for name, p in list(model.named_parameters()):
        value = torch.empty(p.shape, dtype=dtype, device=device).normal_(0.0, 0.02)
        set_module_tensor_to_device(model, name, device, value=value, dtype=dtype)
    return model.to(device).eval()


def _qwen_pipeline(device: str, dtype: Any, transformer: dict, vae: dict) -> Any:
    from diffusers import (
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        QwenImageEditPipeline,
        QwenImageTransformer2DModel,
    )

    pipe = QwenImageEditPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(base_image_seq_len=256, max_image_seq_len=8192, base_shift=0.5,
                                                  max_shift=0.9, shift_terminal=0.02, use_dynamic_shifting=True),
        vae=random_model(AutoencoderKLQwenImage, vae, device, dtype),
        text_encoder=None, tokenizer=None, processor=None,
        transformer=random_model(QwenImageTransformer2DModel, transformer, device, dtype),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _flux_pipeline(device: str, dtype: Any, transformer: dict, controlnet: dict, vae: dict) -> Any:
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        FluxControlNetModel,
        FluxControlNetPipeline,
        FluxMultiControlNetModel,
        FluxTransformer2DModel,
    )

    pipe = FluxControlNetPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_image_seq_len=256,
                                                  max_image_seq_len=4096, base_shift=0.5, max_shift=1.15),
        vae=random_model(AutoencoderKL, vae, device, dtype),
        text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
        transformer=random_model(FluxTransformer2DModel, transformer, device, dtype),
        controlnet=FluxMultiControlNetModel([random_model(FluxControlNetModel, controlnet, device, dtype)]),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def stage_throughput(stage: str, device: str, side: int, steps: int, step_pair: tuple[int, int] = (2, 6),
                     configs: dict[str, dict] | None = None, text_len: int = 512) -> dict[str, float]:
    """Images/s of one stage at ``steps`` steps, from timed calls at the two step counts ``step_pair``."""
    import torch
    from PIL import Image

    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    configs = configs or {}
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (side, side, 3), dtype=np.uint8))
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    if stage == "refine":
        pipe = _qwen_pipeline(device, dtype, configs.get("transformer", QWEN_EDIT), configs.get("vae", {}))
        dim = pipe.transformer.config.joint_attention_dim
        emb = torch.randn(1, text_len, dim, device=device, dtype=dtype)
        mask = torch.ones(1, text_len, dtype=torch.long, device=device)
        kwargs = dict(image=image, prompt_embeds=emb, prompt_embeds_mask=mask, negative_prompt_embeds=emb,
                      negative_prompt_embeds_mask=mask, true_cfg_scale=4.0, height=side, width=side)
    else:
        pipe = _flux_pipeline(device, dtype, configs.get("transformer", FLUX_DEV),
                              configs.get("controlnet", UNION_PRO), configs.get("vae", FLUX_VAE))
        t = pipe.transformer.config
        kwargs = dict(
            prompt_embeds=torch.randn(1, text_len, t.joint_attention_dim, device=device, dtype=dtype),
            pooled_prompt_embeds=torch.randn(1, t.pooled_projection_dim, device=device, dtype=dtype),
            control_image=[image, image], control_mode=[2, 0], controlnet_conditioning_scale=[0.6, 0.4],
            control_guidance_start=[0.0, 0.0], control_guidance_end=[0.8, 0.8], guidance_scale=4.5,
            height=side, width=side,
        )

    def timed(p: Any, n_steps: int) -> float:
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.inference_mode():
            p(num_inference_steps=n_steps, generator=torch.Generator("cpu").manual_seed(0), output_type="pil",
                 **kwargs)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    timed(pipe, 1)  # warm-up: kernels, allocator
    s1, s2 = step_pair
    t1, t2 = timed(pipe, s1), timed(pipe, s2)
    per_step = max((t2 - t1) / (s2 - s1), 0.0)
    fixed = max(t1 - per_step * s1, 0.0)
    out = {
        f"{stage}_seconds_per_step": per_step,
        f"{stage}_seconds_fixed": fixed,
        f"{stage}_images_per_s": 1.0 / (fixed + per_step * steps),
    }
    if device.startswith("cuda"):
        out[f"{stage}_gpu_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    del pipe
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return {k: round(v, 4) for k, v in out.items()}


def run() -> dict[str, float]:
    """CPU overheads always; full-size images/s and memory peaks per stage when CUDA is present."""
    import torch

    result = cpu_overhead()
    if torch.cuda.is_available():
        result |= stage_throughput("refine", "cuda", side=1024, steps=50)
        result |= stage_throughput("synthesize", "cuda", side=1024, steps=28)
    return result


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    print(json.dumps(run(), indent=2, sort_keys=True))  # noqa: T201 (the module's CLI output)
