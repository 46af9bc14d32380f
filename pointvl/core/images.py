"""PNG encodings of the image columns, in one place (``schemas/README.md`` "Images").

- RGB (``render``, ``refined``, ``image``): 8-bit RGB PNG.
- ``mask``: 8-bit grey PNG, 255 = object, 0 = background.
- ``depth``: 16-bit grey PNG, value = camera-frame ``z * depth_scale`` rounded; 0 = background.
- ``normal_map``: RGB PNG, world-frame unit normal ``n`` stored as ``round((n + 1) / 2 * 255)``;
  background ``(0, 0, 0)`` (never a unit normal, so decoding recovers the background exactly).

Pillow writes the same bytes for the same array, so encoded columns are deterministic.

Also here: :func:`smart_resize`, the size Qwen2.5-VL's processor gives an image, which the annotate stage's
grounding and the evaluation's endpoint predictor both need to read a box back in pixels.
"""

from __future__ import annotations

import io
import math

import numpy as np
from numpy.typing import NDArray
from PIL import Image

__all__ = [
    "decode_depth",
    "decode_mask",
    "decode_normals",
    "decode_rgb",
    "encode_depth",
    "encode_mask",
    "encode_normals",
    "encode_rgb",
    "smart_resize",
]

_UINT16_MAX = 65535


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _open(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data))


def encode_rgb(rgb: NDArray[np.uint8]) -> bytes:
    """``(H, W, 3)`` uint8 -> RGB PNG bytes."""
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"RGB images must be (H, W, 3) uint8, got {rgb.shape} {rgb.dtype}")
    return _png(Image.fromarray(rgb))


def decode_rgb(data: bytes) -> NDArray[np.uint8]:
    """RGB PNG bytes -> ``(H, W, 3)`` uint8."""
    return np.asarray(_open(data).convert("RGB"), dtype=np.uint8)


def encode_mask(mask: NDArray[np.bool_]) -> bytes:
    """``(H, W)`` bool -> 8-bit grey PNG bytes (255 = object)."""
    if mask.ndim != 2:
        raise ValueError(f"masks must be (H, W), got {mask.shape}")
    return _png(Image.fromarray(np.where(mask, 255, 0).astype(np.uint8)))


def decode_mask(data: bytes) -> NDArray[np.bool_]:
    """8-bit grey PNG bytes -> ``(H, W)`` bool (pixels >= 128 are object)."""
    return np.asarray(_open(data).convert("L")) >= 128


def encode_depth(depth: NDArray[np.floating], depth_scale: float) -> bytes:
    """``(H, W)`` camera-frame depth (0 = background) -> 16-bit PNG of ``round(z * depth_scale)``.

    Raises ValueError when a depth does not fit in 16 bits: lower ``depth_scale`` or move the camera
    closer.
    """
    if depth.ndim != 2:
        raise ValueError(f"depth maps must be (H, W), got {depth.shape}")
    if not np.all(np.isfinite(depth)) or np.any(depth < 0):
        raise ValueError("depth must be finite and >= 0 (0 = background)")
    q = np.rint(depth.astype(np.float64) * depth_scale)
    if q.max(initial=0) > _UINT16_MAX:
        raise ValueError(
            f"depth {depth.max():.3f} x depth_scale {depth_scale} exceeds 16 bits ({_UINT16_MAX}); "
            "lower depth_scale or the camera distance"
        )
    return _png(Image.fromarray(q.astype(np.uint16)))


def decode_depth(data: bytes, depth_scale: float) -> NDArray[np.float32]:
    """16-bit PNG bytes -> ``(H, W)`` float32 camera-frame depth (0 = background)."""
    return (np.asarray(_open(data), dtype=np.float64) / depth_scale).astype(np.float32)


def encode_normals(normals: NDArray[np.floating], mask: NDArray[np.bool_]) -> bytes:
    """``(H, W, 3)`` world-frame unit normals -> RGB PNG of ``round((n + 1) / 2 * 255)``, 0 off ``mask``."""
    if normals.ndim != 3 or normals.shape[2] != 3 or normals.shape[:2] != mask.shape:
        raise ValueError(f"normals must be (H, W, 3) matching mask {mask.shape}, got {normals.shape}")
    rgb = np.rint((np.clip(normals, -1.0, 1.0) + 1.0) / 2.0 * 255.0).astype(np.uint8)
    rgb[~mask] = 0
    return _png(Image.fromarray(rgb))


def decode_normals(data: bytes) -> NDArray[np.float32]:
    """RGB PNG bytes -> ``(H, W, 3)`` float32 unit normals; background pixels ``(0, 0, 0)`` decode to 0."""
    rgb = decode_rgb(data).astype(np.float64)
    n = rgb / 255.0 * 2.0 - 1.0
    background = np.all(rgb == 0, axis=2)
    n /= np.maximum(np.linalg.norm(n, axis=2, keepdims=True), 1e-12)
    n[background] = 0.0
    return n.astype(np.float32)


def smart_resize(
    height: int, width: int, factor: int = 28, min_pixels: int = 3136, max_pixels: int = 12845056
) -> tuple[int, int]:
    """The size Qwen2.5-VL's processor resizes an image to (sides multiples of ``factor``).

    Restated from transformers' ``qwen2_vl.image_processing_qwen2_vl.smart_resize``: importing that
    module needs torchvision, which the annotation workers do not otherwise install."""
    h = max(factor, round(height / factor) * factor)
    w = max(factor, round(width / factor) * factor)
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = math.floor(height / beta / factor) * factor
        w = math.floor(width / beta / factor) * factor
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return h, w
