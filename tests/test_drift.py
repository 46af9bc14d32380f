"""Pose-drift score and control images."""

from __future__ import annotations

import numpy as np
from gpu_inputs import disk

from pointvl.dataset.drift import canny, contour, depth_control, drift_score


def test_canny_finds_the_disk_outline():
    rgb, mask, _ = disk(64, 48, 0)
    edges = canny(rgb)
    outline = contour(mask)
    assert edges.any() and outline.any()
    assert edges.sum() < 3 * outline.sum()  # thin (non-maximum suppressed), not a blob
    assert not canny(np.full((32, 32, 3), 128, np.uint8)).any()


def test_drift_is_low_in_place_and_high_when_moved():
    rgb, mask, _ = disk(64, 48, 0)
    assert drift_score(rgb, mask) < 0.05
    moved = np.roll(rgb, 12, axis=1)
    assert drift_score(moved, mask) > 0.5
    assert drift_score(np.full_like(rgb, 200), mask) == 1.0  # no edges at all
    assert drift_score(rgb, np.zeros_like(mask)) == 1.0  # nothing to compare against


def test_depth_control_near_is_bright_background_black():
    _, mask, depth = disk(64, 48, 0)
    ctrl = depth_control(depth)
    assert ctrl.shape == (48, 64, 3) and ctrl.dtype == np.uint8
    assert (ctrl[~mask] == 0).all()
    nearest = np.unravel_index(np.argmin(np.where(mask, depth, np.inf)), depth.shape)
    assert ctrl[nearest][0] == 255 and ctrl[mask].min() >= 50
