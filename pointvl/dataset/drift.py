"""Edges and the pose-drift score of a synthesized image against its render.

The paper removes samples with "geometric distortion or pose drift" by manual verification (§4.1.2).
This score ranks items for that review; it does not replace it.

``drift = 1 - recall``: the fraction of the render's silhouette contour (mask boundary pixels) that
has **no** edge of the synthesized image within ``tolerance_px`` pixels. An image that kept the
object's outline in place scores near 0; a moved, rescaled or reshaped object scores high. Interior
texture edges of the synthesized image are not penalised (they are expected in a photoreal image).
An empty mask has no contour to check: drift 1.0, so the item is flagged.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage


def grey(rgb: NDArray[np.uint8]) -> NDArray[np.float64]:
    """``(H, W, 3)`` uint8 -> ``(H, W)`` luma in [0, 1] (ITU-R 601 weights)."""
    return (rgb.astype(np.float64) @ np.array([0.299, 0.587, 0.114])) / 255.0


def canny(rgb: NDArray[np.uint8], sigma: float = 1.0, low: float = 0.1, high: float = 0.2) -> NDArray[np.bool_]:
    """Canny edges: Gaussian blur, Sobel gradient, non-maximum suppression, hysteresis.

    ``low``/``high`` are gradient-magnitude thresholds for a [0, 1] grey image with a unit step
    giving magnitude 1 (the Sobel response divided by 4).
    """
    g = ndimage.gaussian_filter(grey(rgb), sigma)
    gx = ndimage.sobel(g, axis=1) / 4.0
    gy = ndimage.sobel(g, axis=0) / 4.0
    mag = np.hypot(gx, gy)
    # Non-maximum suppression along the gradient direction, quantised to 0/45/90/135 degrees.
    angle = (np.rad2deg(np.arctan2(gy, gx)) + 180.0) % 180.0
    p = np.pad(mag, 1)
    h, w = mag.shape
    nb = {
        0: (p[1:h + 1, 2:], p[1:h + 1, :w]),
        45: (p[2:, 2:], p[:h, :w]),
        90: (p[2:, 1:w + 1], p[:h, 1:w + 1]),
        135: (p[2:, :w], p[:h, 2:]),
    }
    q = (np.round(angle / 45.0).astype(int) % 4) * 45
    keep = np.zeros_like(mag, dtype=bool)
    for a, (n1, n2) in nb.items():
        sel = q == a
        keep |= sel & (mag >= n1) & (mag >= n2)
    nms = np.where(keep, mag, 0.0)
    weak = nms >= low
    strong = nms >= high
    labels, n = ndimage.label(weak, structure=np.ones((3, 3)))
    if n == 0:
        return np.zeros_like(weak)
    has_strong = np.zeros(n + 1, dtype=bool)
    has_strong[np.unique(labels[strong])] = True
    has_strong[0] = False
    return has_strong[labels]


def contour(mask: NDArray[np.bool_]) -> NDArray[np.bool_]:
    """The mask's boundary pixels (object pixels with a background 4-neighbour or on the border)."""
    return mask & ~ndimage.binary_erosion(mask, border_value=0)


def drift_score(image: NDArray[np.uint8], mask: NDArray[np.bool_], tolerance_px: float = 3.0,
                sigma: float = 1.0, low: float = 0.1, high: float = 0.2) -> float:
    """``1 -`` the fraction of ``mask``'s contour within ``tolerance_px`` of an edge of ``image``."""
    if image.shape[:2] != mask.shape:
        raise ValueError(f"image {image.shape[:2]} and mask {mask.shape} sizes differ")
    outline = contour(mask)
    if not outline.any():
        return 1.0
    edges = canny(image, sigma, low, high)
    if not edges.any():
        return 1.0
    distance = ndimage.distance_transform_edt(~edges)
    return float(1.0 - np.mean(distance[outline] <= tolerance_px))


def depth_control(depth: NDArray[np.floating]) -> NDArray[np.uint8]:
    """A depth map as a depth-ControlNet expects it: near bright, far dark, background black, RGB."""
    valid = depth > 0
    out = np.zeros(depth.shape, dtype=np.float64)
    if valid.any():
        near, far = float(depth[valid].min()), float(depth[valid].max())
        span = max(far - near, 1e-6)
        out[valid] = 0.2 + 0.8 * (far - depth[valid]) / span  # the farthest object pixel stays above black
    grey8 = np.rint(out * 255.0).astype(np.uint8)
    return np.repeat(grey8[..., None], 3, axis=2)


def canny_control(rgb: NDArray[np.uint8], sigma: float = 1.0, low: float = 0.1,
                  high: float = 0.2) -> NDArray[np.uint8]:
    """Canny edges of ``rgb`` as a white-on-black RGB control image."""
    e = canny(rgb, sigma, low, high)
    return np.repeat((e.astype(np.uint8) * 255)[..., None], 3, axis=2)
