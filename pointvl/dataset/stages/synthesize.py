"""synthesize: FLUX.1-Krea-dev + ControlNet-Union-Pro photoreal images (paper §4.1.2).

Input: the refine table (``refined``) joined with the render table (``category``, ``mask``,
``depth``, ``depth_scale``) on ``instance_id``. Control images come from the refined render: its
Canny edges (Union mode 0) and the render's depth (Union mode 2), either or both; one Union net
takes them all through ``FluxMultiControlNetModel``. Control Guidance Termination: the ControlNet
acts only in the first ``control_guidance_end`` = 80% of steps (diffusers still calls it after
that, at scale 0). The prompt is ``prompts/synthesize/<version>.txt`` with ``{category}`` filled.

Output per instance: ``image`` (RGB PNG at the render's size), ``drift`` and ``drift_flagged``
(:mod:`pointvl.dataset.stages.drift`, for the review gate), ``synthesize_provenance`` (JSON). Seeded per
instance, so a re-run reproduces the image.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from pointvl.dataset.run_folder import RunFolder
from pointvl.dataset.stages.base import Drops, ShardOutput, read_stage_table
from pointvl.dataset.stages.drift import canny_control, depth_control, drift_score
from pointvl.dataset.stages.gpu_common import (
    GpuStage,
    GpuStageConfig,
    encode_outputs,
    generation_size,
    instance_seed,
    prepare,
    run_items,
    text_inputs,
)
from pointvl.core import images
from pointvl.core.errors import check_range

logger = logging.getLogger(__name__)

STAGE = "synthesize"
CONTROL_MODES = {"canny": 0, "depth": 2}  # ControlNet-Union-Pro's mode ids (notes/FACTS.md)
RENDER_COLUMNS = ("instance_id", "category", "mask", "depth", "depth_scale")
SCHEMA = pa.schema([
    ("instance_id", pa.string()),
    ("image", pa.binary()),
    ("drift", pa.float64()),
    ("drift_flagged", pa.bool_()),
    ("synthesize_provenance", pa.string()),
])



@dataclass
class SynthesizeConfig(GpuStageConfig):
    """FLUX + ControlNet-Union-Pro synthesis from the refined renders (paper §4.1.2), with the settings
    of :class:`~pointvl.dataset.stages.gpu_common.GpuStageConfig` (backend, prompt, seed, device, batching);
    ``passthrough`` carries the refined image forward.

    Args:
        model: Hub id or local folder of the base FLUX pipeline (paper: FLUX.1-Krea-dev).
        controlnet_model: Hub id or local folder of the Union ControlNet (paper: ControlNet-Union-Pro;
            its modes: canny 0, tile 1, depth 2, blur 3, pose 4, gray 5, low quality 6; Union-Pro-2.0 has
            no modes and gets none).
        controls: control images, any of ``depth`` (from the render's depth) and ``canny`` (edges of
            the refined image); ``control_mode`` is set from these when the ControlNet has modes.
        conditioning_scales: ControlNet scale per control, same order (not in the paper).
        control_guidance_end: fraction of steps with control (paper: first 80% -> 0.8).
        num_inference_steps: denoising steps (not in the paper; FLUX.1-Krea-dev's card: 28).
        guidance_scale: FLUX distilled guidance (not in the paper; the Krea-dev card: 4.5).
        true_cfg_scale: > 1 runs true CFG with the negative prompt (twice the cost); default off.
        canny_sigma, canny_low, canny_high: Canny parameters for the control and the drift score.
        drift_tolerance_px: silhouette-to-edge distance still counted as agreement.
        drift_threshold: items with drift above it are flagged for review.
    """

    stage = STAGE
    model: str = "black-forest-labs/FLUX.1-Krea-dev"
    controlnet_model: str = "Shakker-Labs/FLUX.1-dev-ControlNet-Union-Pro"
    controls: tuple[str, ...] = ("depth", "canny")
    conditioning_scales: tuple[float, ...] = (0.6, 0.4)
    control_guidance_end: float = 0.8
    num_inference_steps: int = 28
    guidance_scale: float = 4.5
    true_cfg_scale: float = 1.0
    canny_sigma: float = 1.0
    canny_low: float = 0.1
    canny_high: float = 0.2
    drift_tolerance_px: float = 3.0
    drift_threshold: float = 0.5

    def __post_init__(self) -> None:
        self.controls = tuple(self.controls)  # YAML/JSON give lists
        self.conditioning_scales = tuple(float(s) for s in self.conditioning_scales)
        super().__post_init__()
        if not self.controls or any(c not in CONTROL_MODES for c in self.controls) or len(
                set(self.controls)) != len(self.controls):
            raise ValueError(f"synthesize.controls must be distinct names from {sorted(CONTROL_MODES)}, "
                             f"got {self.controls}")
        if len(self.conditioning_scales) != len(self.controls):
            raise ValueError(f"synthesize.conditioning_scales needs one scale per control {self.controls}, "
                             f"got {self.conditioning_scales}")
        if not 0.0 < self.control_guidance_end <= 1.0:
            raise ValueError(f"synthesize.control_guidance_end must be in (0, 1], got {self.control_guidance_end}")
        if self.num_inference_steps < 1:
            raise ValueError(f"synthesize.num_inference_steps must be >= 1, got {self.num_inference_steps}")
        check_range("synthesize.num_inference_steps", self.num_inference_steps, 1, 1000, 28)
        if not 0.0 <= self.canny_low <= self.canny_high:
            raise ValueError(f"synthesize: need 0 <= canny_low <= canny_high, got {self.canny_low}, {self.canny_high}")
        if not 0.0 <= self.drift_threshold <= 1.0 or self.drift_tolerance_px < 0:
            raise ValueError("synthesize.drift_threshold must be in [0, 1] and drift_tolerance_px >= 0")
        if "{category}" not in self.prompt()[0]:
            raise ValueError(f"prompts/synthesize/{self.prompt_version}.txt must contain a {{category}} placeholder")

    def model_ids(self) -> dict[str, str]:
        return {"model": self.model, "controlnet": self.controlnet_model}


def control_modes(pipe: Any, controls: tuple[str, ...]) -> list[int] | None:
    """The Union mode ids the ControlNet gets, one per control; ``None`` for a ControlNet without modes
    (ControlNet-Union-Pro-2.0: diffusers' ``FluxControlNetModel`` sets ``union = num_mode is not None``
    and a net that is not a union takes no mode)."""
    return [CONTROL_MODES[c] for c in controls] if pipe.controlnet.nets[0].union else None


def category_name(category: str) -> str:
    """ShapeNet names list synonyms (``"car,auto,automobile"``): the prompt uses the first."""
    return category.split(",")[0].strip()


class Synthesize(GpuStage):
    """Stage ``synthesize``: one shard of refined renders, synthesized (``pipeline``: a
    ``FluxControlNetPipeline`` whose ``controlnet`` is a ``FluxMultiControlNetModel``)."""

    name = STAGE
    inputs = ("refine", "render")
    schema = SCHEMA
    config_class = SynthesizeConfig

    def process_shard(self, run: RunFolder, shard_index: int, drops: Drops) -> ShardOutput:
        cfg = self.config
        # 1. check inputs and the backend before any model work (a finished shard never gets here)
        refined = read_stage_table(run, "refine", shard_index)
        renders = read_stage_table(run, "render", shard_index)
        missing = [c for c in RENDER_COLUMNS if c not in renders.column_names]
        if missing:
            raise ValueError(f"{run.stage_table('render', shard_index)} lacks {missing}; re-run render")
        by_id = {r["instance_id"]: r for r in renders.select(list(RENDER_COLUMNS)).to_pylist()}
        lost = [i for i in refined.column("instance_id").to_pylist() if i not in by_id]
        if lost:
            raise ValueError(f"refine shard {shard_index:05d} has ids missing from render: {lost[:3]}")
        inputs = pa.Table.from_pylist(
            [r | by_id[r["instance_id"]] for r in refined.select(["instance_id", "refined"]).to_pylist()])
        template, negative, version = cfg.prompt()
        # 2. load the model once per process (resident across shards)
        settings = {
            "controls": list(cfg.controls),
            "conditioning_scales": list(cfg.conditioning_scales),
            "control_guidance_end": cfg.control_guidance_end,
            "num_inference_steps": cfg.num_inference_steps,
            "guidance_scale": cfg.guidance_scale,
            "true_cfg_scale": cfg.true_cfg_scale,
        }
        backend, pipe, base = prepare(STAGE, cfg, self.pipeline, self.encode_prompt, settings)
        if pipe is not None and len(pipe.controlnet.nets) != 1:
            raise ValueError("expected one Union ControlNet inside FluxMultiControlNetModel")
        if pipe is not None:  # the modes actually applied: none for a ControlNet without modes
            base["control_mode"] = control_modes(pipe, cfg.controls)
        base |= {"prompt_version": version, "drift_threshold": cfg.drift_threshold}
        self.model_seconds = 0.0

        # 3. per item: control images, seeded generation, drift score, provenance
        def process(rows: list[dict]) -> list[dict]:
            seeds = [instance_seed(cfg.seed, STAGE, r["instance_id"]) for r in rows]
            prompts = [template.format(category=category_name(r["category"])) for r in rows]
            if pipe is None:
                outs = [r["refined"] for r in rows]
            else:
                outs = self._generate(pipe, rows, seeds, prompts, negative)
            result = []
            for r, out, s, p in zip(rows, outs, seeds, prompts, strict=True):
                drift = drift_score(images.decode_rgb(out), images.decode_mask(r["mask"]), cfg.drift_tolerance_px,
                                    cfg.canny_sigma, cfg.canny_low, cfg.canny_high)
                result.append({
                    "instance_id": r["instance_id"],
                    "image": out,
                    "drift": drift,
                    "drift_flagged": drift > cfg.drift_threshold,
                    "synthesize_provenance": json.dumps(base | {"seed": s, "prompt": p}, sort_keys=True),
                })
            return result

        # 4. run the items not finished yet; the base writes the shard
        out = run_items(run, STAGE, shard_index, inputs, process, SCHEMA, drops, batch_size=cfg.batch_size)
        out.stats |= {"backend": backend, "model_seconds": round(self.model_seconds, 4),
                      "drift_flagged": int(sum(out.rows.column("drift_flagged").to_pylist()))}
        return out

    def control_images(self, row: dict) -> list[np.ndarray]:
        """The control images for one item, in ``config.controls`` order."""
        cfg = self.config
        out = []
        for c in cfg.controls:
            if c == "depth":
                out.append(depth_control(images.decode_depth(row["depth"], row["depth_scale"])))
            else:
                out.append(canny_control(images.decode_rgb(row["refined"]), cfg.canny_sigma, cfg.canny_low,
                                         cfg.canny_high))
        return out

    def _generate(self, pipe: Any, rows: list[dict], seeds: list[int], prompts: list[str],
                  negative: str | None) -> list[bytes]:
        import torch
        from PIL import Image

        cfg = self.config
        controls = [self.control_images(r) for r in rows]
        h, w = controls[0][0].shape[:2]
        if any(c[0].shape[:2] != (h, w) for c in controls):
            return [b for r, s, p in zip(rows, seeds, prompts, strict=True)
                    for b in self._generate(pipe, [r], [s], [p], negative)]
        th, tw = generation_size(pipe, h, w)
        n = len(rows)
        k = len(cfg.controls)
        text = text_inputs(self.encode_prompt, prompts, negative if cfg.true_cfg_scale > 1 else None)
        # FluxMultiControlNetModel: one list per control, each over the batch
        control_image = [[Image.fromarray(c[j]) for c in controls] for j in range(k)]
        generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
        t0 = time.perf_counter()
        result = pipe(
            control_image=[ci if n > 1 else ci[0] for ci in control_image],
            control_mode=control_modes(pipe, cfg.controls),
            controlnet_conditioning_scale=list(cfg.conditioning_scales),
            control_guidance_start=[0.0] * k,
            control_guidance_end=[cfg.control_guidance_end] * k,  # one per control, or the zip drops controls
            num_inference_steps=cfg.num_inference_steps,
            guidance_scale=cfg.guidance_scale,
            true_cfg_scale=cfg.true_cfg_scale,
            height=th,
            width=tw,
            generator=generators if n > 1 else generators[0],
            output_type="pil",
            **text,
        ).images
        self.model_seconds += time.perf_counter() - t0
        return encode_outputs(result, h, w)
