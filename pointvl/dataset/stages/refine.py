"""refine: Qwen-Image-Edit as a "semantic low-pass filter" over each render (paper §4.1.2).

Input: the render stage table (``render`` RGB PNG, ``mask``). Output per instance: ``refined`` (RGB
PNG at the render's size), the alignment gate's ``align_iou``, ``align_shift_px``, ``align_scale``
and ``align_flagged`` (:mod:`pointvl.dataset.stages.alignment`) and ``refine_provenance`` (JSON: backend,
pipeline class, model ids, seed, prompt version, settings, generation size). The prompt is versioned
text in ``prompts/refine/<version>.txt`` (negative prompt beside it).

Backends (see :mod:`pointvl.dataset.diffusion_pipelines`): ``diffusers`` runs the class the checkpoint
names (``QwenImageEditPipeline``, or ``QwenImageEditPlusPipeline`` for -2509/-2511); ``passthrough``
carries the render forward byte for byte. Items are resumable one by one
(:mod:`pointvl.dataset.stages.gpu_common`).

Alignment. Both pipelines resize the condition image to ~1 MP at the input's aspect ratio whatever
``height``/``width`` say, and Qwen-Image's RoPE positions are centred: an output grid other than the
condition grid is a zoom/shift of the object against the render's boxes, keypoints and camera.
Refine therefore generates at exactly the condition size (:func:`condition_size`) and resizes the
result back to the render's size; then the gate compares the refined object with the render mask.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from pointvl.dataset.run_folder import RunFolder
from pointvl.dataset.stages.alignment import alignment
from pointvl.dataset.stages.base import Drops, ShardOutput, read_stage_table
from pointvl.dataset.stages.gpu_common import (
    GpuStage,
    GpuStageConfig,
    encode_outputs,
    instance_seed,
    prepare,
    run_items,
    text_inputs,
)
from pointvl.core import images
from pointvl.core.errors import check_range

logger = logging.getLogger(__name__)

STAGE = "refine"
INPUT_COLUMNS = ("instance_id", "render", "mask")
SCHEMA = pa.schema([
    ("instance_id", pa.string()),
    ("refined", pa.binary()),
    ("align_iou", pa.float64()),
    ("align_shift_px", pa.float64()),
    ("align_scale", pa.float64()),
    ("align_flagged", pa.bool_()),
    ("refine_provenance", pa.string()),
])
ALIGN_POLICIES = ("flag", "drop")

@dataclass
class RefineConfig(GpuStageConfig):
    """Qwen-Image-Edit refinement of the renders (paper §4.1.2), with the settings of
    :class:`~pointvl.dataset.stages.gpu_common.GpuStageConfig` (backend, prompt, seed, device, batching).

    Args:
        model: Hub id or local folder of the Qwen-Image-Edit pipeline (paper: Qwen-Image-Edit; -2509/-2511
            load as QwenImageEditPlusPipeline, the class their model_index.json names).
        num_inference_steps: denoising steps (not in the paper; the model card's 50).
        true_cfg_scale: true classifier-free guidance scale; CFG runs only when > 1, with the negative
            prompt (not in the paper; the model card's 4.0).
        align_iou_min: the alignment gate (not in the paper; its manual check of "geometric distortion
            or pose drift", §4.1.2, made automatic; :mod:`pointvl.dataset.stages.alignment`): an item
            whose refined foreground has an IoU with the render mask below this is misaligned: a gross
            change (another shape, extra objects); kept low because a part recoloured close to the
            background also lowers it (measured down to 0.64 on aligned edits); zooms and shifts are
            caught by the two thresholds below.
        align_shift_max_px: an item whose foreground is best overlaid on the mask by a shift longer than
            this (render pixels) is misaligned; the shift replaces a centroid shift, which a part lost to
            the background colour moves by several pixels.
        align_scale_max: an item best overlaid by a zoom beyond this factor (either way) is misaligned.
        align_tolerance: colour difference from the refined image's background (max over RGB, 0-1)
            above which a pixel is foreground.
        align_policy: ``flag`` keeps misaligned items, flagged for review (listed first on the
            contact sheet); ``drop`` leaves them out of the shard (``dropped_misaligned``).
    """

    stage = STAGE
    model: str = "Qwen/Qwen-Image-Edit"
    num_inference_steps: int = 50
    true_cfg_scale: float = 4.0
    align_iou_min: float = 0.5
    align_shift_max_px: float = 1.25
    align_scale_max: float = 1.05
    align_tolerance: float = 0.1
    align_policy: str = "flag"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.num_inference_steps < 1:
            raise ValueError(f"refine.num_inference_steps must be >= 1, got {self.num_inference_steps}")
        check_range("refine.num_inference_steps", self.num_inference_steps, 1, 1000, 50)
        if self.true_cfg_scale < 0:
            raise ValueError(f"refine.true_cfg_scale must be >= 0 (<= 1 disables CFG), got {self.true_cfg_scale}")
        if not 0.0 <= self.align_iou_min <= 1.0 or self.align_shift_max_px < 0 or self.align_scale_max < 1:
            raise ValueError("refine needs align_iou_min in [0, 1] (default 0.5), align_shift_max_px >= 0 "
                             f"(default 1.25) and align_scale_max >= 1 (default 1.05), got {self.align_iou_min}, "
                             f"{self.align_shift_max_px}, {self.align_scale_max}")
        if not 0.0 < self.align_tolerance < 1.0:
            raise ValueError(f"refine.align_tolerance must be in (0, 1) (default 0.1), got {self.align_tolerance}")
        if self.align_policy not in ALIGN_POLICIES:
            raise ValueError(f"refine.align_policy must be one of {ALIGN_POLICIES}, got {self.align_policy!r}")

    def model_ids(self) -> dict[str, str]:
        return {"model": self.model}

    def misaligned(self, iou: float, shift_px: float, scale: float) -> bool:
        """The gate: the scores of :func:`~pointvl.dataset.stages.alignment.alignment` beyond the thresholds."""
        return (iou < self.align_iou_min or shift_px > self.align_shift_max_px
                or max(scale, 1 / scale) > self.align_scale_max)


def condition_size(pipe: Any, width: int, height: int) -> tuple[int, int]:
    """``(width, height)`` that ``pipe`` resizes a ``width x height`` condition image to: generating at
    this size makes the output latent grid equal the condition grid.

    diffusers 0.42.1, ``pipelines/qwenimage/``: ``pipeline_qwenimage_edit.py`` L624 computes
    ``calculate_dimensions(1024 * 1024, w / h)``, L662-664 resize the condition to it whatever
    ``height``/``width`` say, L712-717 put the output grid (from ``height``/``width``, floored to a
    multiple of ``2 * vae_scale_factor`` at L628-630) and the condition grid in ``img_shapes``.
    ``pipeline_qwenimage_edit_plus.py`` L702 sizes its VAE condition with
    ``calculate_dimensions(VAE_IMAGE_SIZE = 1024 * 1024, w / h)``, L753-760 the same ``img_shapes``
    (the 384² ``CONDITION_IMAGE_SIZE`` image only feeds the text encoder). The functions are looked
    up in those modules at call time, so the size is always the one the pipeline itself computes.
    """
    import diffusers.pipelines.qwenimage.pipeline_qwenimage_edit as edit
    import diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus as edit_plus

    if isinstance(pipe, edit_plus.QwenImageEditPlusPipeline):
        w, h = edit_plus.calculate_dimensions(edit_plus.VAE_IMAGE_SIZE, width / height)
    elif isinstance(pipe, edit.QwenImageEditPipeline):
        w, h, _ = edit.calculate_dimensions(1024 * 1024, width / height)
    else:
        raise ValueError(f"refine runs QwenImageEditPipeline or QwenImageEditPlusPipeline, got {type(pipe).__name__}")
    multiple = pipe.vae_scale_factor * 2
    if w % multiple or h % multiple:  # the pipeline would floor the output size and break the match
        raise ValueError(f"condition size {w}x{h} is not a multiple of the pipeline's {multiple}-pixel grid")
    return w, h


class Refine(GpuStage):
    """Stage ``refine``: one shard of renders, refined (``pipeline``: a ``QwenImageEditPipeline`` or
    ``QwenImageEditPlusPipeline``)."""

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
        base |= {"prompt_version": version, "align_iou_min": cfg.align_iou_min, "align_scale_max": cfg.align_scale_max,
                 "align_shift_max_px": cfg.align_shift_max_px, "align_tolerance": cfg.align_tolerance}
        if pipe is not None:
            base["pipeline"] = type(pipe).__name__
        self.model_seconds = 0.0

        # 3. per item: seed, edit at the condition size, alignment gate, provenance
        def process(rows: list[dict]) -> list[dict]:
            seeds = [instance_seed(cfg.seed, STAGE, r["instance_id"]) for r in rows]
            if pipe is None:
                outs, sizes = [r["render"] for r in rows], [None] * len(rows)
            else:
                outs, sizes = self._edit(pipe, [images.decode_rgb(r["render"]) for r in rows], seeds, prompt,
                                         negative)
            result = []
            for r, out, s, size in zip(rows, outs, seeds, sizes, strict=True):
                iou, shift, scale = alignment(images.decode_rgb(out), images.decode_mask(r["mask"]),
                                              cfg.align_tolerance)
                extra = {} if size is None else {"generation_size": list(size)}
                result.append({
                    "instance_id": r["instance_id"],
                    "refined": out,
                    "align_iou": iou,
                    "align_shift_px": shift,
                    "align_scale": scale,
                    "align_flagged": cfg.misaligned(iou, shift, scale),
                    "refine_provenance": json.dumps(base | {"seed": s} | extra, sort_keys=True),
                })
            return result

        # 4. run the items not finished yet; misaligned items are flagged or dropped; the base writes the shard
        out = run_items(run, STAGE, shard_index, renders.select(list(INPUT_COLUMNS)), process, SCHEMA, drops,
                        batch_size=cfg.batch_size)
        flagged = out.rows.column("align_flagged").to_pylist()
        if cfg.align_policy == "drop" and any(flagged):
            # the item files keep them (a resumed shard does not regenerate them); the shard leaves them out
            for row in out.rows.filter(pa.array(flagged)).to_pylist():
                drops.add(row["instance_id"], "misaligned", f"refined vs render mask: IoU {row['align_iou']:.3f}, "
                          f"shift {row['align_shift_px']:.2f} px, scale {row['align_scale']:.3f}")
            out.rows = out.rows.filter(pa.array([not f for f in flagged]))
        out.stats |= {"backend": backend, "model_seconds": round(self.model_seconds, 4),
                      "align_flagged": int(sum(flagged)), "align_policy": cfg.align_policy}
        return out

    def _edit(self, pipe: Any, rgbs: list[np.ndarray], seeds: list[int], prompt: str,
              negative: str | None) -> tuple[list[bytes], list[tuple[int, int]]]:
        """Refined PNGs at the renders' size, and the ``(width, height)`` each was generated at."""
        import time

        import torch
        from diffusers import QwenImageEditPlusPipeline
        from PIL import Image

        cfg = self.config
        h, w = rgbs[0].shape[:2]
        # Edit-Plus reads a list of images as several references for one prompt: one image per call
        one_per_call = isinstance(pipe, QwenImageEditPlusPipeline) or any(x.shape[:2] != (h, w) for x in rgbs)
        if len(rgbs) > 1 and one_per_call:
            parts = [self._edit(pipe, [x], [s], prompt, negative) for x, s in zip(rgbs, seeds, strict=True)]
            return [b for p in parts for b in p[0]], [z for p in parts for z in p[1]]
        tw, th = condition_size(pipe, w, h)
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
        return encode_outputs(result, h, w), [(tw, th)] * n
