"""kpts2d: keypoints inside the mask, spread out, thin parts, tiny and empty masks, bbox2d."""

from __future__ import annotations

import numpy as np
import pytest

from pointvl.core import images
from pointvl.core.geometry import keypoint_containment
from pointvl.dataset.stages.kpts2d import Kpts2D, Kpts2DConfig, bbox_from_mask, keypoints_from_mask


def _inside(mask: np.ndarray, kpts: np.ndarray) -> np.ndarray:
    cols, rows = np.floor(kpts[:, 0]).astype(int), np.floor(kpts[:, 1]).astype(int)
    return mask[rows, cols]


def _shapes() -> dict[str, np.ndarray]:
    yy, xx = np.mgrid[:96, :128]
    ring = ((xx - 64) ** 2 + (yy - 48) ** 2 < 40**2) & ((xx - 64) ** 2 + (yy - 48) ** 2 > 25**2)
    ell = np.zeros((96, 128), bool)
    ell[10:90, 10:30] = True
    ell[70:90, 10:120] = True
    two = np.zeros((96, 128), bool)
    two[5:30, 5:40] = True
    two[60:90, 80:125] = True
    border = np.zeros((96, 128), bool)
    border[:, :50] = True  # touches the image edges
    return {"ring": ring, "ell": ell, "two_parts": two, "border": border}


@pytest.mark.parametrize("name", list(_shapes()))
def test_keypoints_lie_inside_the_mask_at_pixel_centres(name: str) -> None:
    mask = _shapes()[name]
    kpts = keypoints_from_mask(mask)
    assert kpts.shape == (16, 2) and kpts.dtype == np.float32
    assert np.all(_inside(mask, kpts))
    assert np.allclose(kpts % 1.0, 0.5)
    assert len({tuple(p) for p in kpts.tolist()}) == 16
    # eroded: every keypoint is more than 2 px from the background (these shapes have no thin parts)
    padded = np.pad(mask, 3)
    disk = [(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3) if dx * dx + dy * dy <= 4]
    for x, y in np.floor(kpts).astype(int) + 3:
        assert all(padded[y + dy, x + dx] for dy, dx in disk)
    assert keypoint_containment(kpts, bbox_from_mask(mask)) == 1.0


def test_keypoints_spread_over_the_silhouette() -> None:
    mask = _shapes()["two_parts"]
    kpts = keypoints_from_mask(mask)
    in_first = (kpts[:, 0] < 40) & (kpts[:, 1] < 30)
    assert 3 <= in_first.sum() <= 13, "both parts get keypoints"
    # farthest-point sampling: no two keypoints closer than a few pixels
    d = np.linalg.norm(kpts[:, None] - kpts[None], axis=-1) + np.eye(16) * 1e9
    assert d.min() > 5


def test_thin_parts_keep_keypoints() -> None:
    """A 1-px-wide pole that erosion would remove still gets keypoints, on the pole itself."""
    mask = np.zeros((64, 128), bool)
    mask[20:40, 4:24] = True
    mask[30, 24:124] = True
    kpts = keypoints_from_mask(mask, erode_px=3)
    assert np.all(_inside(mask, kpts))
    assert np.sum(kpts[:, 0] > 40) >= 4


def test_deterministic_and_seeded() -> None:
    mask = _shapes()["ell"]
    a, b = keypoints_from_mask(mask, seed=1), keypoints_from_mask(mask, seed=1)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, keypoints_from_mask(mask, seed=2))


def test_tiny_mask_repeats_its_pixels() -> None:
    mask = np.zeros((10, 10), bool)
    mask[4, 4:7] = True
    kpts = keypoints_from_mask(mask, k=16)
    assert kpts.shape == (16, 2) and np.all(_inside(mask, kpts))
    assert len({tuple(p) for p in kpts.tolist()}) == 3
    assert np.array_equal(kpts[:3], kpts[3:6])


def test_empty_mask_raises() -> None:
    with pytest.raises(ValueError, match="empty"):
        keypoints_from_mask(np.zeros((8, 8), bool))
    with pytest.raises(ValueError, match="empty"):
        bbox_from_mask(np.zeros((8, 8), bool))


def test_bbox_uses_continuous_coordinates() -> None:
    mask = np.zeros((20, 30), bool)
    mask[3:8, 10:21] = True  # rows 3..7, columns 10..20
    assert bbox_from_mask(mask) == [10.0, 3.0, 21.0, 8.0]


def test_stage_reads_the_mask_png() -> None:
    mask = _shapes()["ring"]
    row = Kpts2D(Kpts2DConfig()).run_mask(images.encode_mask(mask))
    assert row["bbox2d"] == bbox_from_mask(mask)
    assert np.array_equal(np.asarray(row["kpts2d"], np.float32), keypoints_from_mask(mask))


@pytest.mark.parametrize("kwargs", [{"k": 0}, {"erode_px": -1}])
def test_config_validation(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        Kpts2DConfig(**kwargs)
