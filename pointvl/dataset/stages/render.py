"""Stage `render`: category-adaptive views of a mesh to RGB, depth, mask and normal map (paper §4.1.2).

The cameras are :mod:`pointvl.dataset.cameras`'s, the images :mod:`pointvl.dataset.renderers`' (Open3D
ray casting or PyTorch3D rasterization, the same images for the same camera).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import trimesh

from pointvl.core import images
from pointvl.core.errors import check_range
from pointvl.dataset.cameras import DEFAULT_VIEWS, load_view_config, sample_cameras
from pointvl.dataset.mesh import NORMALIZATION
from pointvl.dataset.plan import ModelEntry, instance_id
from pointvl.dataset.renderers import BACKENDS, Renderer, make_renderer
from pointvl.dataset.stages.base import Drops, MeshStage, ShardOutput

logger = logging.getLogger(__name__)

MAX_SIZE = 4096  # pixels a side


@dataclass
class RenderConfig:
    """Rendering (paper §4.1.2 "Category-Adaptive View Sampling").

    Args:
        width: image width in pixels (default 512).
        height: image height in pixels (default 512).
        views_per_model: views rendered per model; azimuths are stratified over the category's
            ranges so several views spread out.
        elevation_deg: range of camera elevation above the horizontal plane, degrees. The paper
            constrains elevation to a range whose numbers were lost in extraction; (15, 35) looks
            slightly down on the object, as product photos do.
        fov_deg: field of view across the shorter image side, degrees (not in the paper; 40).
        margin: fraction of the half field of view left free around the object's bounding sphere.
        backend: "auto" (pytorch3d with CUDA, else open3d), "open3d" or "pytorch3d".
        depth_scale: depth PNG value per world unit (1000: millimetres for a unit-sized object).
        ambient: ambient term of the flat shading, the same in both backends.
        diffuse: diffuse (headlight) term of the flat shading.
        background: RGB of background pixels.
        seed: mixed with (synset id, model id) for each model's cameras.
        views_path: the YAML of azimuth ranges per synset id.
    """

    width: int = 512
    height: int = 512
    views_per_model: int = 1
    elevation_deg: tuple[float, float] = (15.0, 35.0)
    fov_deg: float = 40.0
    margin: float = 0.1
    backend: str = "auto"
    depth_scale: float = 1000.0
    ambient: float = 0.4
    diffuse: float = 0.6
    background: tuple[int, int, int] = (255, 255, 255)
    seed: int = 0
    views_path: str = DEFAULT_VIEWS

    def __post_init__(self) -> None:
        self.elevation_deg = (float(self.elevation_deg[0]), float(self.elevation_deg[1]))
        self.background = (int(self.background[0]), int(self.background[1]), int(self.background[2]))
        for name in ("width", "height"):  # memory grows with width x height (~100 bytes a pixel)
            check_range(f"render.{name}", getattr(self, name), 1, MAX_SIZE, 512, "memory grows with the pixel count")
        check_range("render.views_per_model", self.views_per_model, 1, 360, 1)
        lo, hi = self.elevation_deg
        if not -89.0 <= lo <= hi <= 89.0:
            raise ValueError(
                f"render.elevation_deg must satisfy -89 <= lo <= hi <= 89 (default 15, 35), got {lo, hi}"
            )
        if not 1.0 <= self.fov_deg <= 150.0:
            raise ValueError(f"render.fov_deg must be in [1, 150] (default 40), got {self.fov_deg}")
        if not 0.0 <= self.margin < 1.0:
            raise ValueError(f"render.margin must be in [0, 1) (default 0.1), got {self.margin}")
        if self.backend not in BACKENDS:
            raise ValueError(f"render.backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.depth_scale <= 0:
            raise ValueError(f"render.depth_scale must be > 0 (default 1000), got {self.depth_scale}")
        if self.ambient < 0 or self.diffuse < 0 or self.ambient + self.diffuse > 1.0:
            raise ValueError(
                f"render needs ambient, diffuse >= 0 with a sum <= 1, got {self.ambient}, {self.diffuse}"
            )
        if not all(0 <= c <= 255 for c in self.background):
            raise ValueError(f"render.background must be RGB in [0, 255], got {self.background}")
        # depth is stored as 16-bit z * depth_scale: a normalized mesh (bbox diagonal 1) is seen from
        # its bounding sphere's fitting distance, so its farthest point is that distance + 0.5
        half = np.radians(self.fov_deg) / 2
        far = 0.5 / np.sin(np.arctan((1.0 - self.margin) * np.tan(half))) + 0.5
        if far * self.depth_scale > 65535:
            raise ValueError(
                f"render.depth_scale {self.depth_scale} x the farthest depth {far:.2f} (fov_deg {self.fov_deg}, "
                f"margin {self.margin}) exceeds 16 bits: lower depth_scale to <= {int(65535 / far)} or widen fov_deg"
            )
        load_view_config(self.views_path)


_matrix = pa.list_(pa.list_(pa.float64()))
SCHEMA = pa.schema(
    [("instance_id", pa.string())]
    + [(c, pa.binary()) for c in ("render", "depth", "mask", "normal_map")]
    + [("K", _matrix), ("R", _matrix), ("t", pa.list_(pa.float64()))]
    + [(c, pa.int64()) for c in ("width", "height", "view_index")]
    + [(c, pa.float64()) for c in ("elevation_deg", "azimuth_deg", "depth_scale")]
    + [(c, pa.string()) for c in ("render_backend", "mesh_normalization", "synset_id", "model_id", "category")]
)


class Render(MeshStage):
    """Stage `render`: one model → one record per view with the render stage table columns."""

    name = "render"
    schema = SCHEMA
    config_class = RenderConfig

    def __init__(self, config: RenderConfig | None = None) -> None:
        super().__init__(config)
        self._renderer: Renderer | None = None

    @property
    def renderer(self) -> Renderer:
        if self._renderer is None:
            self._renderer = make_renderer(self.config.backend, self.config)
            logger.info("render backend: %s", self._renderer.name)
        return self._renderer

    def run_model(self, mesh: trimesh.Trimesh, synset_id: str, model_id: str) -> list[dict]:
        """Render ``cfg.views_per_model`` views; each dict holds ``instance_id`` and the render columns."""
        cfg = self.config
        # 1. cameras around the bounding-box centre, far enough for the bounding sphere to fit
        lo, hi = np.asarray(mesh.bounds, dtype=np.float64)
        center = (lo + hi) / 2
        radius = float(np.linalg.norm(np.asarray(mesh.vertices) - center, axis=1).max())
        cameras = sample_cameras(synset_id, model_id, cfg, center=tuple(center), radius=max(radius, 1e-6))
        # 2. render
        start = time.perf_counter()
        outputs = self.renderer.render_views(mesh, cameras)
        logger.debug(
            "rendered %s/%s: %d views in %.2f s",
            synset_id,
            model_id,
            len(cameras),
            time.perf_counter() - start,
        )
        # 3. encode (the mesh's normalization goes to the records' provenance)
        normalization = json.dumps(mesh.metadata.get(NORMALIZATION, {"normalized": False}), sort_keys=True)
        rows = []
        for cam, out in zip(cameras, outputs, strict=True):
            if not out.mask.any():
                logger.warning(
                    "%s/%s view %d: the object is not in the image", synset_id, model_id, cam.view_index
                )
            rows.append(
                {
                    "instance_id": instance_id(synset_id, model_id, cam.view_index),
                    "render": images.encode_rgb(out.rgb),
                    "depth": images.encode_depth(out.depth, cfg.depth_scale),
                    "mask": images.encode_mask(out.mask),
                    "normal_map": images.encode_normals(out.normals, out.mask),
                    "K": cam.K.tolist(),
                    "R": cam.R.tolist(),
                    "t": cam.t.tolist(),
                    "width": cam.width,
                    "height": cam.height,
                    "view_index": cam.view_index,
                    "elevation_deg": cam.elevation_deg,
                    "azimuth_deg": cam.azimuth_deg,
                    "depth_scale": cfg.depth_scale,
                    "render_backend": self.renderer.name,
                    "mesh_normalization": normalization,
                }
            )
        return rows

    def model_rows(self, model: ModelEntry, mesh: trimesh.Trimesh, views_per_model: int, drops: Drops) -> list[dict]:
        """:meth:`run_model`'s rows (``config.views_per_model`` views, which the plan's ``views_per_model``
        repeats) with the model's ids and category; a failure drops the model into ``drops``."""
        ids = {"synset_id": model.synset_id, "model_id": model.model_id, "category": model.category}
        with drops.guard(f"{model.synset_id}/{model.model_id}"):
            return [{**row, **ids} for row in self.run_model(mesh, model.synset_id, model.model_id)]
        return []

    def output(self, rows: list[dict]) -> ShardOutput:
        return ShardOutput(rows, {"backend": self.renderer.name})
