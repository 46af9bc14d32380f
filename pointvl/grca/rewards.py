"""Field rewards and the reprojection-consistency reward of one parsed output (paper §3.3-3.4).

All rewards lie in [0, 1] and are computed on de-quantized coordinates (pixels, world units):

- ``bbox2d``: IoU of the predicted and target 2D boxes.
- ``bbox3d``: IoU of the predicted and target axis-aligned 3D boxes.
- ``kpts2d``: fraction of predicted 2D keypoints inside the *target* bbox2d (eq. 8; containment,
  not matching to target keypoints).
- ``kpts3d``: fraction of predicted 3D keypoints inside the target bbox3d.
  Both containment tests widen the target box by half a quantization bin per side: the policy can
  only name bin centres, and target keypoints lie on the box's faces.
- **Keypoint-spread guard** (optional, off by default: ``keypoint_spread = 0``). Containment cannot see
  keypoints collapsed onto one point inside the box (they earn the full reward). With
  ``keypoint_spread = s > 0`` each keypoint reward is multiplied by ``min(1, d / (s * d_box))``, where
  ``d`` is the RMS distance of the predicted keypoints from their centroid and ``d_box`` that of points
  uniform in the target box (``|extent| / sqrt(12)``). It is ours, not the paper's; it does not see
  keypoints spread over the box's corners.
- ``rpc``: IoU of the predicted bbox2d with the 2D box enclosing the projected corners of the
  predicted bbox3d (eq. 11-13); 0 when a corner is at or behind the camera.
- ``format``: 1 when all six fields are valid, else 0.
- ``answer``: 1 when the answer equals the target's after ``strip().casefold()``, else 0. This
  exact-match rule is ours; the paper does not define answer correctness for training.

An invalid field scores 0 (§3.7), and RPC is 0 unless both bbox2d and bbox3d are valid.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import numpy as np

from pointvl.core.spatial import QuantConfig, iou_2d, iou_3d, keypoint_containment, project_box3d
from pointvl.grca.parse import FIELDS, ParsedField

logger = logging.getLogger(__name__)

REWARD_KEYS: tuple[str, ...] = ("bbox2d", "bbox3d", "kpts2d", "kpts3d", "rpc", "format", "answer")


def check_target(target: Mapping[str, Any]) -> None:
    """Raise ValueError unless ``target`` has ``bbox2d`` (4 pixels), ``bbox3d`` (6 world), ``answer``."""
    missing = [k for k in ("bbox2d", "bbox3d", "answer") if k not in target]
    if missing:
        raise ValueError(f"target needs keys bbox2d, bbox3d, answer (de-quantized); missing {missing}")
    if np.asarray(target["bbox2d"]).size != 4 or np.asarray(target["bbox3d"]).size != 6:
        raise ValueError("target bbox2d must hold 4 numbers [x1, y1, x2, y2] and bbox3d 6 [min xyz, max xyz]")


def check_camera(camera: Mapping[str, Any]) -> None:
    """Raise ValueError unless ``camera`` has ``K``, ``R`` (3x3), ``t`` (3), ``width``, ``height`` > 0."""
    missing = [k for k in ("K", "R", "t", "width", "height") if k not in camera]
    if missing:
        raise ValueError(f"camera needs keys K, R, t, width, height (schemas/README.md); missing {missing}")
    if np.shape(camera["K"]) != (3, 3) or np.shape(camera["R"]) != (3, 3) or np.size(camera["t"]) != 3:
        raise ValueError("camera K and R must be 3x3 and t a 3-vector (OpenCV, x ~ K (R X + t))")
    if not (camera["width"] > 0 and camera["height"] > 0):
        raise ValueError(f"camera width and height must be > 0, got {camera['width']} x {camera['height']}")


def spread_factor(kpts: np.ndarray, box: Any, keypoint_spread: float) -> float:
    """The guard's factor ``min(1, d / (keypoint_spread * d_box))`` (module docstring); 1 when it is off."""
    if keypoint_spread <= 0:
        return 1.0
    dim = kpts.shape[1]
    b = np.asarray(box, dtype=np.float64).reshape(2 * dim)
    d_box = float(np.linalg.norm(b[dim:] - b[:dim])) / np.sqrt(12.0)
    d = float(np.sqrt(((kpts - kpts.mean(axis=0)) ** 2).sum(axis=1).mean()))
    if not (np.isfinite(d) and d_box > 0):
        return 0.0
    return min(1.0, d / (keypoint_spread * d_box))


def output_rewards(
    parsed: Mapping[str, ParsedField],
    target: Mapping[str, Any],
    camera: Mapping[str, Any],
    quant: QuantConfig,
    keypoint_spread: float = 0.0,
) -> dict[str, float]:
    """Rewards of one parsed output, keyed by :data:`REWARD_KEYS` (formulas in the module docstring).

    ``target`` and ``camera`` are assumed checked (:func:`check_target`, :func:`check_camera`);
    ``keypoint_spread`` > 0 turns the keypoint-spread guard on (0: off, the paper's reward).
    """
    w, h = float(camera["width"]), float(camera["height"])
    gt2, gt3 = target["bbox2d"], target["bbox3d"]
    ok = {f: parsed[f].valid for f in FIELDS}
    b2 = quant.dequantize_2d(parsed["bbox2d"].value, w, h) if ok["bbox2d"] else None
    b3 = quant.dequantize_3d(parsed["bbox3d"].value) if ok["bbox3d"] else None
    r = dict.fromkeys(REWARD_KEYS, 0.0)
    if b2 is not None:
        r["bbox2d"] = iou_2d(b2, gt2)
    if b3 is not None:
        r["bbox3d"] = iou_3d(b3, gt3)
    if ok["kpts2d"]:
        half_bin = np.array([w, h]) / (quant.bins - 1) / 2
        k2 = quant.dequantize_2d(parsed["kpts2d"].value, w, h)
        r["kpts2d"] = keypoint_containment(k2, gt2, half_bin) * spread_factor(k2, gt2, keypoint_spread)
    if ok["kpts3d"]:
        half_bin = (quant.hi3d - quant.lo3d) / (quant.bins - 1) / 2
        k3 = quant.dequantize_3d(parsed["kpts3d"].value)
        r["kpts3d"] = keypoint_containment(k3, gt3, half_bin) * spread_factor(k3, gt3, keypoint_spread)
    if b2 is not None and b3 is not None:
        projected = project_box3d(b3, camera["K"], camera["R"], camera["t"])
        r["rpc"] = iou_2d(projected, b2) if projected is not None else 0.0
    r["format"] = float(all(ok.values()))
    if ok["answer"]:
        said = parsed["answer"].value.strip().casefold()
        r["answer"] = float(said == str(target["answer"]).strip().casefold())
    return r
