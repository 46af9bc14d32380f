"""Category-adaptive cameras (paper §4.1.2 "Category-Adaptive View Sampling").

Cameras follow ``schemas/README.md``: OpenCV ``K, R, t`` with ``x ~ K (R X + t)``, world = the
object's normalized frame, pixel ``(i, j)`` centred at ``(i + 0.5, j + 0.5)``. Each view looks at
the bounding-box centre from azimuth/elevation drawn per category (``pointvl/configs/views.yaml``
states the azimuth convention; ShapeNet's front is −Z, so az = 180 sees the front), at the distance
where the bounding sphere fills ``1 - margin`` of the half field of view.
"""

from __future__ import annotations

import functools
import hashlib
import os
from dataclasses import dataclass
from typing import Protocol

import numpy as np
from numpy.typing import NDArray

from pointvl.core import io
from pointvl.core.package_data import config_path

DEFAULT_VIEWS = str(config_path("views.yaml"))

Ranges = tuple[tuple[float, float], ...]


class CameraSettings(Protocol):
    """The fields of :class:`pointvl.dataset.stages.render.RenderConfig` that :func:`sample_cameras` reads."""

    width: int
    height: int
    views_per_model: int
    elevation_deg: tuple[float, float]
    fov_deg: float
    margin: float
    seed: int
    views_path: str

@dataclass(frozen=True)
class ViewConfig:
    """Azimuth ranges (degrees) per synset id, and the ranges of any other synset."""

    default: Ranges
    categories: dict[str, Ranges]

    def azimuth_ranges(self, synset_id: str) -> Ranges:
        return self.categories.get(synset_id, self.default)


def _ranges(value: object, where: str) -> Ranges:
    if not isinstance(value, list) or not value:
        raise ValueError(f"{where}: azimuth_deg must be a non-empty list of [lo, hi] pairs")
    out = []
    for pair in value:
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(x, int | float) for x in pair)):
            raise ValueError(f"{where}: each azimuth range must be [lo, hi] in degrees, got {pair!r}")
        lo, hi = float(pair[0]), float(pair[1])
        if not lo <= hi <= lo + 360.0:
            raise ValueError(f"{where}: azimuth range [{lo}, {hi}] needs lo <= hi <= lo + 360")
        out.append((lo, hi))
    return tuple(out)


@functools.lru_cache(maxsize=8)
def load_view_config(path: str) -> ViewConfig:
    """Read and check a views YAML (format and azimuth convention: ``pointvl/configs/views.yaml``)."""
    if not os.path.isfile(path):
        raise ValueError(f"view config {path} does not exist; point RenderConfig.views_path at a views YAML")
    doc = io.read_yaml(path, "view config")
    if not isinstance(doc, dict) or "default" not in doc:
        raise ValueError(
            f"{path}: needs a `default:` entry with azimuth_deg (see pointvl/configs/views.yaml)"
        )
    default = _ranges(doc["default"].get("azimuth_deg"), f"{path} default")
    categories = {
        str(synset): _ranges(entry.get("azimuth_deg"), f"{path} {synset}")
        for synset, entry in (doc.get("categories") or {}).items()
    }
    return ViewConfig(default=default, categories=categories)


@dataclass(frozen=True, eq=False)
class Camera:
    """One view: OpenCV ``K`` (3, 3), world→camera ``R`` (3, 3) and ``t`` (3,), all float64."""

    K: NDArray[np.float64]
    R: NDArray[np.float64]
    t: NDArray[np.float64]
    width: int
    height: int
    elevation_deg: float
    azimuth_deg: float
    view_index: int

    @property
    def center(self) -> NDArray[np.float64]:
        """The camera centre in world coordinates, ``-R^T t``."""
        return -self.R.T @ self.t


def look_at(eye: NDArray[np.float64], target: NDArray[np.float64]) -> tuple[NDArray, NDArray]:
    """``(R, t)`` of an OpenCV camera at ``eye`` looking at ``target`` with world +Y up on the image."""
    forward = target - eye
    forward = forward / np.linalg.norm(forward)
    right = np.cross(forward, [0.0, 1.0, 0.0])
    if np.linalg.norm(right) < 1e-9:
        raise ValueError("look_at: the view direction is vertical; keep |elevation| < 90 degrees")
    right /= np.linalg.norm(right)
    down = np.cross(forward, right)
    R = np.stack([right, down, forward])
    return R, -R @ eye


def _model_rng(seed: int, synset_id: str, model_id: str) -> np.random.Generator:
    digest = hashlib.sha256(f"{synset_id}/{model_id}".encode()).digest()
    return np.random.default_rng([seed, int.from_bytes(digest[:8], "little")])


def _wrap180(deg: float) -> float:
    """An angle in (-180, 180]."""
    w = (deg + 180.0) % 360.0 - 180.0
    return 180.0 if w == -180.0 else w


def sample_cameras(
    synset_id: str,
    model_id: str,
    cfg: CameraSettings,
    center: tuple[float, float, float] = (0.0, 0.0, 0.0),
    radius: float = 0.5,
) -> list[Camera]:
    """``cfg.views_per_model`` cameras looking at ``center``, deterministic in (seed, synset, model).

    View ``i`` takes its azimuth at ``(i + u_i) / n`` of the way through the union of the category's
    ranges (stratified; ``u_i`` uniform) and its elevation uniformly in ``cfg.elevation_deg``. The
    distance puts a sphere of ``radius`` around ``center`` (default: ShapeNet v2's normalized frame,
    bbox diagonal 1) at ``1 - cfg.margin`` of the half field of view.
    """
    if radius <= 0:
        raise ValueError(f"sample_cameras needs radius > 0, got {radius}")
    ranges = load_view_config(cfg.views_path).azimuth_ranges(synset_id)
    widths = np.array([hi - lo for lo, hi in ranges])
    ends = np.cumsum(widths)
    rng = _model_rng(cfg.seed, synset_id, model_id)
    n = cfg.views_per_model
    u_az, u_el = rng.random(n), rng.random(n)

    half = np.radians(cfg.fov_deg) / 2
    focal = min(cfg.width, cfg.height) / 2 / np.tan(half)
    K = np.array([[focal, 0.0, cfg.width / 2], [0.0, focal, cfg.height / 2], [0.0, 0.0, 1.0]])
    distance = radius / np.sin(np.arctan((1.0 - cfg.margin) * np.tan(half)))
    target = np.asarray(center, dtype=np.float64)

    cameras = []
    for i in range(n):
        s = (i + u_az[i]) / n * ends[-1]
        k = min(int(np.searchsorted(ends, s)), len(ranges) - 1)
        az = ranges[k][0] + s - (ends[k] - widths[k])
        el = cfg.elevation_deg[0] + u_el[i] * (cfg.elevation_deg[1] - cfg.elevation_deg[0])
        a, e = np.radians(az), np.radians(el)
        eye = target + distance * np.array([np.cos(e) * np.sin(a), np.sin(e), np.cos(e) * np.cos(a)])
        R, t = look_at(eye, target)
        cameras.append(Camera(K.copy(), R, t, cfg.width, cfg.height, float(el), _wrap180(float(az)), i))
    return cameras
