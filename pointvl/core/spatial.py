"""Pure geometry shared by the build, the rewards and the metrics.

Conventions (``schemas/README.md``):

- Camera: OpenCV pinhole, a world point ``X`` maps to pixels by ``x ~ K (R X + t)``; a point is in
  front of the camera when its camera-frame depth ``(R X + t)_z > 0``.
- ``bbox2d = [x1, y1, x2, y2]`` in continuous pixel coordinates (the image spans ``[0, W] x [0, H]``).
- ``bbox3d = [xmin, ymin, zmin, xmax, ymax, zmax]``, axis-aligned in world units.

Scores on boxes (:func:`iou_2d`, :func:`iou_3d`, :func:`keypoint_containment`) never raise on
degenerate input: a box with zero or negative extent on any axis (inverted corners) or a non-finite
coordinate scores 0, never NaN. Shapes that are not boxes at all still raise ``ValueError``.

Quantization (``docs/design.md#quantization``, one formula everywhere): with ``B`` bins on ``[lo, hi]``,
``q = clamp(round((v - lo) / (hi - lo) * (B - 1)), 0, B - 1)`` and ``v = lo + q * (hi - lo) / (B - 1)``.
``round`` is NumPy's round-half-to-even.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray

logger = logging.getLogger(__name__)

__all__ = [
    "QuantConfig",
    "box3d_corners",
    "camera_depth",
    "dequantize",
    "iou_2d",
    "iou_3d",
    "keypoint_containment",
    "project_box3d",
    "project_points",
    "quantize",
]


def _box(box: ArrayLike, dim: int) -> NDArray[np.float64]:
    """``box`` as a float array of ``2 * dim`` numbers, or ValueError naming the expected layout."""
    b = np.asarray(box, dtype=np.float64).reshape(-1)
    if b.shape != (2 * dim,):
        layout = "[x1, y1, x2, y2]" if dim == 2 else "[xmin, ymin, zmin, xmax, ymax, zmax]"
        raise ValueError(f"expected a {dim}D box {layout} of {2 * dim} numbers, got shape {np.shape(box)}")
    return b


def _volume(b: NDArray[np.float64], dim: int) -> float:
    """Extent product of a box, 0 when any side is <= 0 or any coordinate is non-finite."""
    vals = b.tolist()
    if not all(math.isfinite(v) for v in vals):
        return 0.0
    vol = 1.0
    for k in range(dim):
        side = vals[dim + k] - vals[k]
        if side <= 0:
            return 0.0
        vol *= side
    return vol


def _iou(a: ArrayLike, b: ArrayLike, dim: int) -> float:
    ba, bb = _box(a, dim), _box(b, dim)
    va, vb = _volume(ba, dim), _volume(bb, dim)
    if va == 0.0 or vb == 0.0:
        return 0.0
    la, lb = ba.tolist(), bb.tolist()
    inter = 1.0
    for k in range(dim):
        inter *= max(0.0, min(la[dim + k], lb[dim + k]) - max(la[k], lb[k]))
    return inter / (va + vb - inter)


def iou_2d(a: ArrayLike, b: ArrayLike) -> float:
    """Intersection over union of two ``[x1, y1, x2, y2]`` boxes; 0 if either is degenerate."""
    return _iou(a, b, 2)


def iou_3d(a: ArrayLike, b: ArrayLike) -> float:
    """IoU of two axis-aligned ``[xmin, ymin, zmin, xmax, ymax, zmax]`` boxes; 0 if either is degenerate."""
    return _iou(a, b, 3)


def keypoint_containment(kpts: ArrayLike, box: ArrayLike, tolerance: ArrayLike = 0.0) -> float:
    """Fraction of keypoints inside ``box`` (boundary included): the paper's eq. (8), KPA.

    ``kpts`` is ``(K, D)`` with ``D`` = 2 (``box`` = ``[x1, y1, x2, y2]``) or 3 (``box`` = a bbox3d).
    ``tolerance`` (scalar or per axis) widens the box on every side: rewards and metrics pass half a
    quantization bin, so a keypoint on the box's face (FPS picks extreme points) still counts after
    rounding to a bin. A degenerate box, or no keypoints, gives 0; a keypoint with a non-finite
    coordinate counts as outside.
    """
    p = np.asarray(kpts, dtype=np.float64)
    if p.ndim != 2 or p.shape[1] not in (2, 3):
        raise ValueError(f"keypoints must be (K, 2) or (K, 3), got shape {p.shape}")
    dim = p.shape[1]
    b = _box(box, dim)
    if p.shape[0] == 0 or _volume(b, dim) == 0.0:
        return 0.0
    tol = np.broadcast_to(np.asarray(tolerance, dtype=np.float64), (dim,))
    inside = np.all((p >= b[:dim] - tol) & (p <= b[dim:] + tol), axis=1)
    return float(np.mean(inside))


def _camera(K: ArrayLike, R: ArrayLike, t: ArrayLike) -> tuple[NDArray, NDArray, NDArray]:
    Km = np.asarray(K, dtype=np.float64)
    Rm = np.asarray(R, dtype=np.float64)
    tv = np.asarray(t, dtype=np.float64).reshape(-1)
    if Km.shape != (3, 3) or Rm.shape != (3, 3) or tv.shape != (3,):
        raise ValueError(f"camera needs K (3, 3), R (3, 3), t (3,), got {Km.shape}, {Rm.shape}, {tv.shape}")
    return Km, Rm, tv


def _points(X: ArrayLike) -> NDArray[np.float64]:
    P = np.asarray(X, dtype=np.float64)
    if P.ndim != 2 or P.shape[1] != 3:
        raise ValueError(f"points must be (N, 3), got shape {P.shape}")
    return P


def camera_depth(X: ArrayLike, R: ArrayLike, t: ArrayLike) -> NDArray[np.float64]:
    """Camera-frame depth ``(R X + t)_z`` of world points ``X`` (N, 3) -> (N,)."""
    _, Rm, tv = _camera(np.eye(3), R, t)
    return _points(X) @ Rm[2] + tv[2]


def project_points(X: ArrayLike, K: ArrayLike, R: ArrayLike, t: ArrayLike) -> NDArray[np.float64]:
    """Pixels ``(u, v)`` of world points ``X`` (N, 3) -> (N, 2), with ``x ~ K (R X + t)``.

    No check of depth: a point at depth 0 gives inf/NaN and a point behind the camera projects
    mirrored; use :func:`camera_depth` to keep points with depth > 0.
    """
    Km, Rm, tv = _camera(K, R, t)
    cam = _points(X) @ Rm.T + tv
    hom = cam @ Km.T
    with np.errstate(divide="ignore", invalid="ignore"):
        return hom[:, :2] / hom[:, 2:3]


def box3d_corners(box3d: ArrayLike) -> NDArray[np.float64]:
    """The 8 corners (8, 3) of ``[xmin, ymin, zmin, xmax, ymax, zmax]``, x varying fastest."""
    b = _box(box3d, 3)
    xs, ys, zs = (b[0], b[3]), (b[1], b[4]), (b[2], b[5])
    return np.array([[x, y, z] for z in zs for y in ys for x in xs], dtype=np.float64)


def project_box3d(
    box3d: ArrayLike, K: ArrayLike, R: ArrayLike, t: ArrayLike
) -> NDArray[np.float64] | None:
    """The smallest ``[x1, y1, x2, y2]`` enclosing the 8 projected corners of ``box3d`` (paper eq. 11-12).

    Returns ``None`` when a corner is at or behind the camera (depth <= 0), when a coordinate is not
    finite, or when the box is inverted (a max below its min): such a projection is undefined and
    the reprojection-consistency reward is 0. The result is not clipped to the image (eq. 12 has no
    clipping).
    """
    b = _box(box3d, 3)
    if not np.all(np.isfinite(b)) or np.any(b[3:] < b[:3]):
        return None
    corners = box3d_corners(b)
    if np.any(camera_depth(corners, R, t) <= 0):
        return None
    uv = project_points(corners, K, R, t)
    if not np.all(np.isfinite(uv)):
        return None
    return np.concatenate([uv.min(axis=0), uv.max(axis=0)])


def quantize(v: ArrayLike, lo: ArrayLike, hi: ArrayLike, bins: int) -> NDArray[np.int64]:
    """``clamp(round((v - lo) / (hi - lo) * (bins - 1)), 0, bins - 1)`` elementwise (``docs/design.md#quantization``).

    ``lo``/``hi`` broadcast against ``v``. Values outside ``[lo, hi]`` clamp to the end bins.
    Raises ValueError on non-finite values (a target with NaN is a bug upstream, not a bin).
    """
    x = np.asarray(v, dtype=np.float64)
    if not np.all(np.isfinite(x)):
        raise ValueError("cannot quantize non-finite values; check the target upstream")
    lo_a, hi_a = np.asarray(lo, dtype=np.float64), np.asarray(hi, dtype=np.float64)
    q = np.rint((x - lo_a) / (hi_a - lo_a) * (bins - 1))
    return np.clip(q, 0, bins - 1).astype(np.int64)


def dequantize(q: ArrayLike, lo: ArrayLike, hi: ArrayLike, bins: int) -> NDArray[np.float64]:
    """``lo + q * (hi - lo) / (bins - 1)`` elementwise (``docs/design.md#quantization``); ``q`` must lie in
    ``[0, bins - 1]``."""
    qa = np.asarray(q)
    if qa.size and (np.any(qa < 0) or np.any(qa > bins - 1)):
        raise ValueError(f"bins must lie in [0, {bins - 1}], got min {qa.min()} max {qa.max()}")
    lo_a, hi_a = np.asarray(lo, dtype=np.float64), np.asarray(hi, dtype=np.float64)
    return lo_a + qa.astype(np.float64) * (hi_a - lo_a) / (bins - 1)


@dataclass(frozen=True)
class QuantConfig:
    """Coordinate bins of the model's output (``docs/design.md#quantization``; paper §3.2 "quantize into bins").

    2D coordinates use ``[0, width] x [0, height]`` of the image they refer to; 3D coordinates use
    ``[lo3d, hi3d]`` on every axis (the ShapeNet normalized frame fits in [-1, 1]). Arrays passed to the
    2D methods alternate x, y along their last axis (``bbox2d`` (4,), ``kpts2d`` (K, 2)).

    Attributes:
        bins: number of bins per axis, B (default 1000).
        lo3d: lower end of the 3D range in world units (default -1).
        hi3d: upper end of the 3D range in world units (default 1).
    """

    bins: int = 1000
    lo3d: float = -1.0
    hi3d: float = 1.0

    def __post_init__(self) -> None:
        if not isinstance(self.bins, int) or self.bins < 2:
            raise ValueError(f"QuantConfig.bins must be an int >= 2 (default 1000), got {self.bins!r}")
        if not (np.isfinite(self.lo3d) and np.isfinite(self.hi3d) and self.lo3d < self.hi3d):
            raise ValueError(
                f"QuantConfig needs finite lo3d < hi3d (default -1, 1), got {self.lo3d}, {self.hi3d}"
            )

    @staticmethod
    def _range_2d(shape: tuple[int, ...], width: float, height: float) -> NDArray[np.float64]:
        if not shape or shape[-1] % 2:
            raise ValueError(f"2D coordinates alternate x, y on the last axis; got shape {shape}")
        if not (width > 0 and height > 0):
            raise ValueError(f"image width and height must be > 0, got {width} x {height}")
        return np.tile([width, height], shape[-1] // 2).astype(np.float64)

    def quantize_2d(self, v: ArrayLike, width: float, height: float) -> NDArray[np.int64]:
        """Pixel coordinates (x, y alternating) -> bins on ``[0, width] x [0, height]``."""
        x = np.asarray(v, dtype=np.float64)
        return quantize(x, 0.0, self._range_2d(x.shape, width, height), self.bins)

    def dequantize_2d(self, q: ArrayLike, width: float, height: float) -> NDArray[np.float64]:
        """Bins (x, y alternating) -> pixel coordinates."""
        qa = np.asarray(q)
        return dequantize(qa, 0.0, self._range_2d(qa.shape, width, height), self.bins)

    def quantize_3d(self, v: ArrayLike) -> NDArray[np.int64]:
        """World coordinates -> bins on ``[lo3d, hi3d]``."""
        return quantize(v, self.lo3d, self.hi3d, self.bins)

    def dequantize_3d(self, q: ArrayLike) -> NDArray[np.float64]:
        """Bins -> world coordinates."""
        return dequantize(q, self.lo3d, self.hi3d, self.bins)
