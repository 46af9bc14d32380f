"""pointvl.core.spatial: IoU, containment, projection and quantization, against independent computations."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pointvl.core.spatial import (
    QuantConfig,
    box3d_corners,
    camera_depth,
    dequantize,
    iou_2d,
    iou_3d,
    keypoint_containment,
    project_box3d,
    project_points,
    quantize,
)

small = st.integers(min_value=0, max_value=6)


def _int_box(dim: int) -> st.SearchStrategy[list[int]]:
    return st.lists(small, min_size=2 * dim, max_size=2 * dim)


def _cells(box: list[int], dim: int) -> set[tuple[int, ...]]:
    """Unit cells covered by an integer box (empty when inverted or flat)."""
    ranges = [range(box[k], box[k + dim]) for k in range(dim)]
    return set(itertools.product(*ranges))


@settings(max_examples=200, deadline=None)
@given(_int_box(2), _int_box(2))
def test_iou_2d_equals_cell_count_ratio(a: list[int], b: list[int]) -> None:
    ca, cb = _cells(a, 2), _cells(b, 2)
    expected = len(ca & cb) / len(ca | cb) if ca and cb else 0.0
    assert iou_2d(a, b) == pytest.approx(expected)
    assert iou_2d(a, b) == pytest.approx(iou_2d(b, a))


@settings(max_examples=150, deadline=None)
@given(_int_box(3), _int_box(3))
def test_iou_3d_equals_cell_count_ratio(a: list[int], b: list[int]) -> None:
    ca, cb = _cells(a, 3), _cells(b, 3)
    expected = len(ca & cb) / len(ca | cb) if ca and cb else 0.0
    assert iou_3d(a, b) == pytest.approx(expected)


def test_iou_known_values() -> None:
    assert iou_2d([0, 0, 2, 2], [1, 1, 3, 3]) == pytest.approx(1 / 7)
    assert iou_2d([0, 0, 2, 2], [0, 0, 2, 2]) == 1.0
    assert iou_2d([0, 0, 1, 1], [2, 2, 3, 3]) == 0.0
    assert iou_3d([0, 0, 0, 2, 2, 2], [1, 1, 1, 3, 3, 3]) == pytest.approx(1 / 15)
    # a 2D box extruded over the same depth has the same IoU in 3D
    assert iou_3d([0, 0, 0, 2, 2, 5], [1, 1, 0, 3, 3, 5]) == pytest.approx(1 / 7)


@pytest.mark.parametrize(
    "bad",
    [[0, 0, 0, 1], [2, 0, 1, 1], [0, 0, float("nan"), 1], [0, 0, float("inf"), 1], [1, 1, 1, 1]],
)
def test_degenerate_2d_boxes_score_zero(bad: list[float]) -> None:
    good = [0, 0, 1, 1]
    assert iou_2d(bad, good) == 0.0 and iou_2d(good, bad) == 0.0
    assert keypoint_containment([[0.5, 0.5], [0, 0]], bad) == 0.0


def test_degenerate_3d_boxes_score_zero() -> None:
    good = [0, 0, 0, 1, 1, 1]
    for bad in ([0, 0, 0, 1, 1, 0], [0, 2, 0, 1, 1, 1], [0, 0, 0, 1, float("nan"), 1]):
        assert iou_3d(bad, good) == 0.0
        assert keypoint_containment([[0.5, 0.5, 0.5]], bad) == 0.0


def test_wrong_box_shape_raises() -> None:
    with pytest.raises(ValueError, match="4 numbers"):
        iou_2d([0, 0, 1], [0, 0, 1, 1])
    with pytest.raises(ValueError, match=r"\(K, 2\) or \(K, 3\)"):
        keypoint_containment([0.5, 0.5], [0, 0, 1, 1])


def test_keypoint_containment_exact() -> None:
    box = [0, 0, 10, 20]
    pts = [[0, 0], [10, 20], [5, 5], [11, 5], [5, -1], [float("nan"), 3]]
    assert keypoint_containment(pts, box) == pytest.approx(3 / 6)  # boundary counts as inside
    box3 = [-1, -1, -1, 1, 1, 1]
    assert keypoint_containment([[0, 0, 0], [1, 1, 1], [0, 0, 1.01], [2, 0, 0]], box3) == 0.5
    assert keypoint_containment(np.zeros((0, 3)), box3) == 0.0


def _camera(f: float = 100.0, cx: float = 64.0, cy: float = 48.0, yaw: float = 0.3, d: float = 5.0):
    K = np.array([[f, 0, cx], [0, f, cy], [0, 0, 1.0]])
    c, s = np.cos(yaw), np.sin(yaw)
    R = np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]])
    t = np.array([0.1, -0.2, d])
    return K, R, t


def test_project_points_matches_homogeneous_loop() -> None:
    K, R, t = _camera()
    X = np.random.default_rng(0).uniform(-1, 1, size=(20, 3))
    uv = project_points(X, K, R, t)
    for p, got in zip(X, uv, strict=True):
        h = K @ (R @ p + t)
        assert got == pytest.approx(h[:2] / h[2])
    assert camera_depth(X, R, t) == pytest.approx([(R @ p + t)[2] for p in X])


def test_project_box3d_exact_for_fronto_parallel_camera() -> None:
    f, cx, cy, d = 100.0, 64.0, 48.0, 5.0
    K = np.array([[f, 0, cx], [0, f, cy], [0, 0, 1.0]])
    box = project_box3d([-1, -1, -1, 1, 1, 1], K, np.eye(3), [0, 0, d])
    # the near face (z = -1) is at depth 4 and spans the widest: +-f/4 around the centre
    assert box == pytest.approx([cx - f / 4, cy - f / 4, cx + f / 4, cy + f / 4])


def test_project_box3d_encloses_projected_interior_points() -> None:
    K, R, t = _camera()
    b3 = np.array([-0.4, -0.3, -0.5, 0.6, 0.2, 0.4])
    box = project_box3d(b3, K, R, t)
    assert box is not None
    corners_uv = project_points(box3d_corners(b3), K, R, t)
    assert box == pytest.approx(np.r_[corners_uv.min(0), corners_uv.max(0)])
    inner = np.random.default_rng(1).uniform(b3[:3], b3[3:], size=(500, 3))
    uv = project_points(inner, K, R, t)
    assert np.all(uv >= box[:2] - 1e-9) and np.all(uv <= box[2:] + 1e-9)


def test_project_box3d_none_at_or_behind_camera() -> None:
    K, _, _ = _camera()
    R = np.eye(3)
    assert project_box3d([-1, -1, -1, 1, 1, 1], K, R, [0, 0, 1.0]) is None  # near face at depth 0
    assert project_box3d([-1, -1, -1, 1, 1, 1], K, R, [0, 0, 0.5]) is None  # behind
    assert project_box3d([-1, -1, -1, 1, 1, 1], K, R, [0, 0, 1.0 + 1e-6]) is not None
    assert project_box3d([1, 0, 0, -1, 1, 1], K, R, [0, 0, 5.0]) is None  # inverted
    assert project_box3d([0, 0, 0, float("nan"), 1, 1], K, R, [0, 0, 5.0]) is None


def test_quantize_dequantize_is_identity_on_bins() -> None:
    q = np.arange(1000)
    assert np.array_equal(quantize(dequantize(q, -1.0, 1.0, 1000), -1.0, 1.0, 1000), q)
    assert np.array_equal(quantize(dequantize(q, 0.0, 640.0, 1000), 0.0, 640.0, 1000), q)


@settings(max_examples=200, deadline=None)
@given(st.floats(-1.0, 1.0), st.integers(2, 5000))
def test_quantize_error_is_at_most_half_a_bin(v: float, bins: int) -> None:
    q = quantize(v, -1.0, 1.0, bins)
    assert 0 <= q <= bins - 1
    assert abs(float(dequantize(q, -1.0, 1.0, bins)) - v) <= 1.0 / (bins - 1) + 1e-12


def test_quantize_formula_ends_and_clamp() -> None:
    assert quantize([-1.0, 1.0, -3.0, 7.0, 0.0], -1.0, 1.0, 1000).tolist() == [0, 999, 0, 999, 500]
    # 0 maps to (0 + 1) / 2 * 999 = 499.5, rounded half to even
    assert float(dequantize(500, -1.0, 1.0, 1000)) == pytest.approx(-1 + 500 * 2 / 999)
    with pytest.raises(ValueError, match="non-finite"):
        quantize([np.nan], 0.0, 1.0, 10)
    with pytest.raises(ValueError, match=r"\[0, 9\]"):
        dequantize([10], 0.0, 1.0, 10)


def test_quant_config_2d_uses_width_for_x_and_height_for_y() -> None:
    qc = QuantConfig()
    q = qc.quantize_2d([320.0, 120.0, 640.0, 240.0], 640, 240)
    assert q.tolist() == [quantize(320.0, 0, 640, 1000), quantize(120.0, 0, 240, 1000), 999, 999]
    kp = qc.dequantize_2d([[999, 0], [0, 999]], 640, 240)
    assert kp.tolist() == [[640.0, 0.0], [0.0, 240.0]]
    assert qc.dequantize_3d([0, 999]).tolist() == [-1.0, 1.0]


@pytest.mark.parametrize("kwargs", [{"bins": 1}, {"lo3d": 1.0, "hi3d": -1.0}, {"hi3d": float("inf")}])
def test_quant_config_validation(kwargs: dict) -> None:
    with pytest.raises(ValueError, match="QuantConfig"):
        QuantConfig(**kwargs)


def test_containment_tolerance_admits_keypoints_rounded_off_the_box_face():
    from pointvl.core.spatial import QuantConfig, keypoint_containment

    quant = QuantConfig()
    box = np.array([-0.3, -0.2, -0.1, 0.3005, 0.2, 0.1])
    face_point = np.array([[0.3005, 0.0, 0.0]])  # an FPS keypoint on the +x face
    rounded = quant.dequantize_3d(quant.quantize_3d(face_point))
    assert rounded[0, 0] > box[3]  # rounding to a bin pushed it out
    assert keypoint_containment(rounded, box) == 0.0
    half_bin = (quant.hi3d - quant.lo3d) / (quant.bins - 1) / 2
    assert keypoint_containment(rounded, box, half_bin) == 1.0
    assert keypoint_containment(rounded + [[2 * half_bin, 0, 0]], box, half_bin) == 0.0
