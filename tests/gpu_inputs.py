"""Small render/refine stage tables for the GPU-stage tests: a coloured disk per instance."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from pointvl.core import images
from pointvl.dataset.stages.base import write_stage_table

CATEGORIES = [("03001627", "chair"), ("02958343", "car,auto,automobile,machine,motorcar")]


def disk(width: int, height: int, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(rgb, mask, depth)`` of a shaded disk whose centre and radius depend on ``k``."""
    yy, xx = np.mgrid[0:height, 0:width] + 0.5
    cx, cy, r = width * (0.4 + 0.05 * (k % 3)), height * 0.5, min(width, height) * (0.25 + 0.03 * (k % 2))
    d2 = ((xx - cx) ** 2 + (yy - cy) ** 2) / r**2
    mask = d2 <= 1.0
    depth = np.where(mask, 2.0 - 0.3 * np.sqrt(np.clip(1.0 - d2, 0, 1)), 0.0)
    rgb = np.full((height, width, 3), 230, np.uint8)
    colour = np.array([200 - 40 * k % 160, 60 + 30 * k % 160, 90], np.float64)
    shade = np.sqrt(np.clip(1.0 - d2, 0, 1))[..., None]
    rgb[mask] = (colour * (0.5 + 0.5 * shade))[mask].astype(np.uint8)
    return rgb, mask, depth


def write_render_shard(run_dir: str, shard_index: int = 0, n: int = 3, width: int = 40, height: int = 32) -> list[str]:
    """Write ``RUN/stages/render/shard-{i}.parquet`` with ``n`` disks; returns the instance ids."""
    rows = []
    for k in range(n):
        synset, category = CATEGORIES[k % len(CATEGORIES)]
        rgb, mask, depth = disk(width, height, k)
        rows.append({
            "instance_id": f"{synset}-m{shard_index}x{k:03d}-0",
            "synset_id": synset,
            "category": category,
            "render": images.encode_rgb(rgb),
            "depth": images.encode_depth(depth, 1000.0),
            "mask": images.encode_mask(mask),
            "depth_scale": 1000.0,
            "width": width,
            "height": height,
        })
    write_stage_table(run_dir, "render", shard_index, pa.Table.from_pylist(rows), {"instances": len(rows)})
    return [r["instance_id"] for r in rows]
