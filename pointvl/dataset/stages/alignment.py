"""The alignment gate of refine: is the refined object where the render's mask is, at its size?

A refined image must keep the render's geometry, pose, camera and framing: every annotation of the
record (boxes, keypoints, camera) is the render's. The gate segments the refined image's foreground
and compares it with the render mask:

- **foreground**: the pixels of the refined image that differ from its own background colour by more
  than ``tolerance`` (max over R, G, B, in 0-1). The background colour is the median of the refined
  image's pixels far from the mask (more than 5 % of the shorter side, at least 8 px), so a refine
  that tints the plain background is not misread. Specks (components under 0.2 % of the mask's area)
  are removed, thin parts (legs, wings: a morphological opening would erase them) kept, and holes
  under 1 % of the foreground's area filled (a highlight in the background colour; a mug handle's
  opening is a real hole and stays).
- **IoU** of that foreground with the mask, as it lies: a gross change (another shape, extra objects).
- **shift and scale** (:func:`register`): the zoom about the mask's centroid (1/1.15 to 1.15) and
  then the shift (up to 16 px, sub-pixel) that overlay the foreground best on the mask. An aligned
  refine scores shift ~0 and scale 1; a rigid shift of ``d`` px scores ``d``; a 1.1x zoom about any
  point scores ~1.1 (and the centroid's move as shift).
  Unlike a centroid shift or an area ratio, these are not moved by a part lost to the background
  colour (it lowers the overlap of every nearby move alike): on the fixture's renders, a recoloured
  part moved the centroid by up to 11 px while the registered shift stayed under 0.1 px.

Rates measured on the mini ShapeNet fixture's renders with edit-like changes:
``python -m benchmarks.bench_alignment`` (README, refine section). An empty foreground or mask scores
IoU 0 and an infinite shift and scale, so the item is flagged.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage

SCALES = np.exp(np.linspace(np.log(1 / 1.15), np.log(1.15), 13))
"""Zooms searched by :func:`register`: 1/1.15 to 1.15 in 13 steps of ~2.3 %."""
HOLE_FRACTION = 0.01
"""Holes in the foreground smaller than this fraction of its area are filled."""
SPECK_FRACTION = 0.002
"""Foreground components smaller than this fraction of the mask's area are dropped (specks)."""


def background_colour(rgb: NDArray[np.floating], mask: NDArray[np.bool_]) -> NDArray[np.floating]:
    """The median colour of ``rgb``'s pixels far from ``mask`` (the whole image's border if none are)."""
    margin = max(8.0, 0.05 * min(mask.shape))
    far = ndimage.distance_transform_edt(~mask) > margin if mask.any() else np.ones(mask.shape, bool)
    if not far.any():
        far = np.zeros(mask.shape, bool)
        far[[0, -1], :] = far[:, [0, -1]] = True
    return np.median(rgb[far], axis=0)


def foreground(rgb: NDArray[np.uint8], mask: NDArray[np.bool_], tolerance: float = 0.1) -> NDArray[np.bool_]:
    """The pixels of ``rgb`` that differ from its background by more than ``tolerance`` (module docstring)."""
    if rgb.shape[:2] != mask.shape:
        raise ValueError(f"image {rgb.shape[:2]} and mask {mask.shape} sizes differ")
    image = rgb.astype(np.float32) / 255.0
    fg = np.abs(image - background_colour(image, mask)).max(axis=-1) > tolerance
    # specks (noise, texture in the background) go; thin parts (legs, wings) stay
    specks, n = ndimage.label(fg, structure=np.ones((3, 3), bool))
    if n:
        area = np.bincount(specks.ravel())
        speck = area < SPECK_FRACTION * np.count_nonzero(mask)
        speck[0] = False
        fg &= ~speck[specks]
    # fill small holes (highlights in the background colour), never real openings (a mug's handle)
    holes, n = ndimage.label(ndimage.binary_fill_holes(fg) & ~fg)
    if n:
        area = np.bincount(holes.ravel())
        small = area < HOLE_FRACTION * np.count_nonzero(fg)
        small[0] = False
        fg |= small[holes]
    return fg


def _scaled(mask: NDArray[np.float32], scale: float) -> NDArray[np.float32]:
    """``mask`` scaled by ``scale`` about its centroid (bilinear)."""
    centre = np.array(ndimage.center_of_mass(mask))
    return ndimage.affine_transform(mask, np.full(2, 1.0 / scale), offset=centre * (1 - 1.0 / scale), order=1)


def _overlap(fg: NDArray[np.float32], mask: NDArray[np.float32], pad: int) -> NDArray[np.float64]:
    """Soft IoU of ``fg`` moved by ``(dy, dx)`` onto ``mask``, for every ``|dy|, |dx| <= pad`` (index ``pad`` = 0)."""
    shape = (fg.shape[0] + 2 * pad, fg.shape[1] + 2 * pad)
    inter = np.fft.irfft2(np.fft.rfft2(fg, shape) * np.conj(np.fft.rfft2(mask, shape)), shape)
    inter = np.roll(inter, (pad, pad), axis=(0, 1))[:2 * pad + 1, :2 * pad + 1]  # inter[pad+dy, pad+dx]
    return inter / np.maximum(fg.sum() + mask.sum() - inter, 1e-9)


def _peak(score: NDArray[np.float64]) -> tuple[float, float]:
    """Sub-pixel ``(row, col)`` of the maximum (a parabola through it and its neighbours, per axis)."""
    r, c = np.unravel_index(int(np.argmax(score)), score.shape)
    out = []
    for idx, line in ((r, score[:, c]), (c, score[r, :])):
        offset = 0.0
        if 0 < idx < len(line) - 1:
            a, b, d = line[idx - 1], line[idx], line[idx + 1]
            curvature = a - 2 * b + d
            offset = 0.5 * (a - d) / curvature if curvature < 0 else 0.0
        out.append(idx + offset)
    return out[0], out[1]


def register(fg: NDArray[np.bool_], mask: NDArray[np.bool_], max_shift: int = 16,
             scales: NDArray[np.float64] = SCALES) -> tuple[float, float, float]:
    """The move of ``fg`` (a scale about the mask's centroid, then a shift) that overlays it best on
    ``mask``: ``(shift in px, scale, the soft IoU there)``. Scaling about the object, not the image
    centre, keeps a small error of the scale out of the shift.

    The scale is searched at a working size of at most 256 px a side, the shift at full size for the
    best scale, to a sub-pixel peak. Parts missing from ``fg`` lower the overlap of every nearby move
    alike, so they do not move the peak (unlike a centroid).
    """
    step = max(1, int(np.ceil(max(mask.shape) / 256)))
    small_fg, small_mask = fg[::step, ::step].astype(np.float32), mask[::step, ::step].astype(np.float32)
    pad = max(2, max_shift // step)
    best = max(scales, key=lambda s: _overlap(small_fg, _scaled(small_mask, s), pad).max())
    score = _overlap(fg.astype(np.float32), _scaled(mask.astype(np.float32), best), max_shift)
    dy, dx = np.subtract(_peak(score), max_shift)
    return float(np.hypot(dy, dx)), float(best), float(score.max())


def alignment(rgb: NDArray[np.uint8], mask: NDArray[np.bool_], tolerance: float = 0.1) -> tuple[float, float, float]:
    """``(IoU, shift in px, scale)`` of ``rgb``'s foreground against ``mask`` (module docstring)."""
    fg = foreground(rgb, mask, tolerance)
    if not fg.any() or not mask.any():
        return 0.0, float("inf"), float("inf")
    iou = np.count_nonzero(fg & mask) / np.count_nonzero(fg | mask)
    shift, scale, _ = register(fg, mask)
    return float(iou), shift, scale
