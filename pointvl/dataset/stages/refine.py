"""refine: Qwen-Image-Edit as a "semantic low-pass filter" over each render (paper §4.1.2).

Input: the render stage table (``render`` RGB PNG). Output per instance: ``refined`` (RGB PNG at the
render's size) and ``refine_provenance`` (JSON: backend, model ids, seed, prompt version, settings).
The prompt is versioned text in ``prompts/refine/<version>.txt`` (negative prompt beside it).

Backends (see :mod:`pointvl.dataset.diffusion_pipelines`): ``diffusers`` runs ``QwenImageEditPipeline``; ``passthrough``
carries the render forward byte for byte. Items are resumable one by one
(:mod:`pointvl.dataset.stages.gpu_common`).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from pointvl.core import images
from pointvl.core.errors import check_range
from pointvl.dataset.run_folder import RunFolder
from pointvl.dataset.stages.base import Drops, ShardOutput, read_stage_table
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

logger = logging.getLogger(__name__)

STAGE = "refine"
INPUT_COLUMNS = ("instance_id", "render")
SCHEMA = pa.schema([("instance_id", pa.string()), ("refined", pa.binary()), ("refine_provenance", pa.string())])

@dataclass
class RefineConfig(GpuStageConfig):
    """Qwen-Image-Edit refinement of the renders (paper §4.1.2), with the settings of
    :class:`~pointvl.dataset.stages.gpu_common.GpuStageConfig` (backend, prompt, seed, device, batching).

    Args:
        model: Hub id or local folder of the Qwen-Image-Edit pipeline (paper: Qwen-Image-Edit).
        num_inference_steps: denoising steps (not in the paper; the model card's 50).
        true_cfg_scale: true classifier-free guidance scale; CFG runs only when > 1, with the negative
            prompt (not in the paper; the model card's 4.0).
    """

    stage = STAGE
    model: str = "Qwen/Qwen-Image-Edit"
    num_inference_steps: int = 50
    true_cfg_scale: float = 4.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.num_inference_steps < 1:
            raise ValueError(f"refine.num_inference_steps must be >= 1, got {self.num_inference_steps}")
        check_range("refine.num_inference_steps", self.num_inference_steps, 1, 1000, 50)
        if self.true_cfg_scale < 0:
            raise ValueError(f"refine.true_cfg_scale must be >= 0 (<= 1 disables CFG), got {self.true_cfg_scale}")

    def model_ids(self) -> dict[str, str]:
        return {"model": self.model}


class Refine(GpuStage):
    """Stage ``refine``: one shard of renders, refined (``pipeline``: a ``QwenImageEditPipeline``)."""

    name = STAGE
    inputs = ("render",)
    schema = SCHEMA
    config_class = RefineConfig

    def process_shard(self, run: RunFolder, shard_index: int, drops: Drops) -> ShardOutput:
        cfg = self.config
        # 1. check inputs and the backend before any model work (a finished shard never gets here)
        source = run.stage_table("render", shard_index)
        renders = read_stage_table(run, "render", shard_index)
        missing = [c for c in INPUT_COLUMNS if c not in renders.column_names]
        if missing:
            raise ValueError(f"{source} lacks columns {missing}; re-run the render stage")
        prompt, negative, version = cfg.prompt()
        # 2. load the model once per process (resident across shards)
        settings = {
            "num_inference_steps": cfg.num_inference_steps,
            "true_cfg_scale": cfg.true_cfg_scale,
            "negative_prompt": cfg.true_cfg_scale > 1 and negative is not None,
        }
        backend, pipe, base = prepare(STAGE, cfg, self.pipeline, self.encode_prompt, settings)
        base["prompt_version"] = version
        self.model_seconds = 0.0

        # 3. per item: seed, edit, resize check, provenance
        def process(rows: list[dict]) -> list[dict]:
            seeds = [instance_seed(cfg.seed, STAGE, r["instance_id"]) for r in rows]
            if pipe is None:
                outs = [r["render"] for r in rows]
            else:
                outs = self._edit(pipe, [images.decode_rgb(r["render"]) for r in rows], seeds, prompt, negative)
            return [
                {
                    "instance_id": r["instance_id"],
                    "refined": out,
                    "refine_provenance": json.dumps(base | {"seed": s}, sort_keys=True),
                }
                for r, out, s in zip(rows, outs, seeds, strict=True)
            ]

        # 4. run the items not finished yet; the base writes the shard
        out = run_items(run, STAGE, shard_index, renders.select(list(INPUT_COLUMNS)), process, SCHEMA, drops,
                        batch_size=cfg.batch_size)
        out.stats |= {"backend": backend, "model_seconds": round(self.model_seconds, 4)}
        return out

    def _edit(self, pipe: Any, rgbs: list[np.ndarray], seeds: list[int], prompt: str,
              negative: str | None) -> list[bytes]:
        import time

        import torch
        from PIL import Image

        cfg = self.config
        h, w = rgbs[0].shape[:2]
        if any(x.shape[:2] != (h, w) for x in rgbs):
            return [b for x, s in zip(rgbs, seeds, strict=True) for b in self._edit(pipe, [x], [s], prompt, negative)]
        th, tw = generation_size(pipe, h, w)
        n = len(rgbs)
        text = text_inputs(self.encode_prompt, [prompt] * n, negative if cfg.true_cfg_scale > 1 else None)
        pil = [Image.fromarray(x) for x in rgbs]
        generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
        t0 = time.perf_counter()
        result = pipe(
            image=pil if n > 1 else pil[0],
            true_cfg_scale=cfg.true_cfg_scale,
            height=th,
            width=tw,
            num_inference_steps=cfg.num_inference_steps,
            generator=generators if n > 1 else generators[0],
            output_type="pil",
            **text,
        ).images
        self.model_seconds += time.perf_counter() - t0
        return encode_outputs(result, h, w)
