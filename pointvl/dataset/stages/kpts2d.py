"""Stage `kpts2d`: 2D keypoints and the 2D box from a view's foreground mask (paper §4.1.3).

The paper generates 2D keypoints "via morphological foreground mask processing". Here:

1. erode: keep the pixels farther than ``erode_px`` from the background (Euclidean distance
   transform; the image border counts as background), so keypoints keep clear of the jagged
   silhouette edge; add the ridge of the distance transform (its local maxima, a discrete medial
   axis), so parts thinner than the erosion keep their centre line and still get keypoints;
2. farthest-point sample ``k`` pixels of what is left (start: a pixel chosen by ``seed``), which
   spreads keypoints over the silhouette's extremities and interior;
3. return their pixel centres ``(i + 0.5, j + 0.5)`` (``schemas/README.md``), all inside the mask.

``bbox2d`` is the tight box of the mask in continuous coordinates: columns ``a..b`` give ``x1 = a``,
``x2 = b + 1``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
from numpy.typing import NDArray
from scipy import ndimage

from pointvl.core import images
from pointvl.core.errors import check_range
from pointvl.dataset.run_folder import RunFolder
from pointvl.dataset.stages.base import Drops, Stage, matrix_column, read_stage_table, vector_column

logger = logging.getLogger(__name__)

__all__ = ["Kpts2D", "Kpts2DConfig", "bbox_from_mask", "keypoints_from_mask"]


@dataclass
class Kpts2DConfig:
    """2D keypoints from the foreground mask (paper §4.1.3).

    Args:
        k: keypoints per view (paper: 16, as for kpts3d).
        erode_px: erosion depth in pixels before sampling (thin parts keep their medial axis).
        seed: picks the first farthest-point sample.
    """

    k: int = 16
    erode_px: int = 2
    seed: int = 0

    def __post_init__(self) -> None:
        check_range("kpts2d.k", self.k, 1, 1024, 16, "the paper's 16")
        check_range("kpts2d.erode_px", self.erode_px, 0, 64, 2)


def _check_mask(mask: NDArray) -> NDArray[np.bool_]:
    m = np.asarray(mask)
    if m.ndim != 2:
        raise ValueError(f"mask must be (H, W), got shape {m.shape}")
    m = m.astype(bool)
    if not m.any():
        raise ValueError("the mask is empty: the object is not in the view; drop this view or fix its camera")
    return m


def _interior(mask: NDArray[np.bool_], erode_px: int) -> NDArray[np.bool_]:
    """Pixels deeper than ``erode_px`` in the mask, plus the ridge of its distance transform."""
    depth = ndimage.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]  # the image border is background
    ridge = mask & (depth >= ndimage.maximum_filter(depth, size=3))
    return (depth > erode_px) | ridge


def bbox_from_mask(mask: NDArray) -> list[float]:
    """``[x1, y1, x2, y2]`` of the mask's pixels in continuous pixel coordinates (ValueError if empty)."""
    m = _check_mask(mask)
    rows = np.flatnonzero(m.any(axis=1))
    cols = np.flatnonzero(m.any(axis=0))
    return [float(cols[0]), float(rows[0]), float(cols[-1] + 1), float(rows[-1] + 1)]


def keypoints_from_mask(mask: NDArray, k: int = 16, seed: int = 0, erode_px: int = 2) -> NDArray[np.float32]:
    """``(k, 2)`` float32 keypoints ``(x, y)`` at pixel centres inside ``mask`` (module docstring).

    When erosion leaves fewer than ``k`` pixels the raw mask is sampled instead; a mask with fewer
    than ``k`` pixels repeats its farthest-point order cyclically to fill ``k`` rows, so the result
    is always ``(k, 2)`` and inside the mask. Raises ValueError for an empty or non-2D mask.
    """
    m = _check_mask(mask)
    region = _interior(m, erode_px)
    if region.sum() < k:
        region = m
    ys, xs = np.nonzero(region)
    pts = np.stack([xs, ys], axis=1).astype(np.float64) + 0.5
    n = len(pts)
    if n < k:
        logger.debug("mask has %d pixels < k=%d: repeating keypoints", n, k)
    rng = np.random.default_rng(seed)
    order = [int(rng.integers(n))]
    dist = np.linalg.norm(pts - pts[order[0]], axis=1)
    for _ in range(min(k, n) - 1):
        nxt = int(np.argmax(dist))
        order.append(nxt)
        dist = np.minimum(dist, np.linalg.norm(pts - pts[nxt], axis=1))
    chosen = pts[np.resize(np.asarray(order), k)]
    return chosen.astype(np.float32)


class Kpts2D(Stage):
    """Stage `kpts2d`: a render record's mask → ``bbox2d`` and ``kpts2d`` columns."""

    name = "kpts2d"
    inputs = ("render",)
    schema = pa.schema([("instance_id", pa.string()), ("bbox2d", pa.list_(pa.float32(), 4)),
                        ("kpts2d", pa.list_(pa.list_(pa.float32(), 2)))])
    config_class = Kpts2DConfig

    def run_mask(self, mask_png: bytes) -> dict[str, list]:
        """``{"bbox2d": [x1, y1, x2, y2], "kpts2d": [[x, y] * k]}`` for one view's mask PNG."""
        cfg = self.config
        mask = images.decode_mask(mask_png)
        kpts = keypoints_from_mask(mask, k=cfg.k, seed=cfg.seed, erode_px=cfg.erode_px)
        return {"bbox2d": bbox_from_mask(mask), "kpts2d": kpts.tolist()}

    def rows(self, renders: list[dict], drops: Drops) -> list[dict]:
        """Box and keypoints for each render row (``instance_id``, ``mask``); an empty mask or a failure
        drops the view into ``drops``."""
        rows = []
        for row in renders:
            with drops.guard(row["instance_id"]):
                if not images.decode_mask(row["mask"]).any():
                    drops.add(row["instance_id"], "empty_mask", "the object is not in the view")
                    continue
                rows.append({"instance_id": row["instance_id"], **self.run_mask(row["mask"])})
        drops.check(len(renders))
        return rows

    def to_table(self, rows: list[dict] | pa.Table) -> pa.Table:
        return pa.table({
            "instance_id": pa.array([r["instance_id"] for r in rows], pa.string()),
            "bbox2d": vector_column([np.asarray(r["bbox2d"]) for r in rows], 4),
            "kpts2d": matrix_column([np.asarray(r["kpts2d"]) for r in rows], 2),
        })

    def process_shard(self, run: RunFolder, shard_index: int, drops: Drops) -> list[dict]:
        """Boxes and keypoints from every mask of the shard's render table."""
        renders = read_stage_table(run, "render", shard_index).select(["instance_id", "mask"]).to_pylist()
        return self.rows(renders, drops)
