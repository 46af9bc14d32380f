"""Stage `render`: category-adaptive views of a mesh to RGB, depth, mask and normal map (paper §4.1.2).

Cameras follow ``schemas/README.md``: OpenCV ``K, R, t`` with ``x ~ K (R X + t)``, world = the
object's normalized frame, pixel ``(i, j)`` centred at ``(i + 0.5, j + 0.5)``. Each view looks at
the bounding-box centre from azimuth/elevation drawn per category (``pointvl/configs/views.yaml``
states the azimuth convention; ShapeNet's front is −Z, so az = 180 sees the front), at the distance
where the bounding sphere fills ``1 - margin`` of the half field of view.

Two backends give the same images for the same camera:

- ``open3d``: Open3D's ``RaycastingScene`` (Embree), one ray per pixel centre, the scene built once
  per mesh. Fast on a CPU (measured on 2 busy cores: ~0.05 s per 512² view of an 80k-face mesh,
  ray casting ~0.025 s of it, plus ~0.1 s BVH build per mesh): the choice without CUDA.
- ``pytorch3d``: PyTorch3D's ``MeshRasterizer`` (the paper's), cameras from
  ``cameras_from_opencv_projection``. The choice on CUDA; on a CPU it is naive (pixels × faces:
  ~20 s for 20k faces at 512²).

Both produce, per pixel, the hit face and its barycentric weights; the rest is shared: colour from
:func:`pointvl.dataset.mesh.surface_colors` (face colour or texture), flat shading ``colour * (ambient +
diffuse * |n·v|)`` with a headlight, and the face normal turned towards the camera (ShapeNet meshes
have flipped faces) as the world-frame normal map. Depth is camera-frame ``z``, 0 on background.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import trimesh
from numpy.typing import NDArray

from pointvl.core import images, io
from pointvl.core.errors import check_range
from pointvl.core.package_data import config_path
from pointvl.dataset.mesh import NORMALIZATION, surface_colors
from pointvl.dataset.plan import ModelEntry, instance_id, load_plan
from pointvl.dataset.run_folder import RunFolder
from pointvl.dataset.stages.base import Drops, ShardOutput, Stage, shard_meshes

logger = logging.getLogger(__name__)

__all__ = [
    "Camera",
    "Open3DRenderer",
    "PyTorch3DRenderer",
    "Render",
    "RenderConfig",
    "RenderOutput",
    "Renderer",
    "ViewConfig",
    "load_view_config",
    "look_at",
    "make_renderer",
    "sample_cameras",
]

DEFAULT_VIEWS = str(config_path("views.yaml"))
BACKENDS = ("auto", "open3d", "pytorch3d")
MAX_SIZE = 4096  # pixels a side

Ranges = tuple[tuple[float, float], ...]
Hit = tuple[NDArray[np.int64], NDArray[np.float64], NDArray[np.float64]]  # face ids, barycentric, depth


# 1. configuration


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


# 2. cameras


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
    cfg: RenderConfig,
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


# 3. renderers


@dataclass(frozen=True, eq=False)
class RenderOutput:
    """``rgb`` (H, W, 3) uint8; ``depth`` (H, W) float32 camera z, 0 = background; ``mask`` (H, W)
    bool; ``normals`` (H, W, 3) float32 world-frame unit normals facing the camera, 0 = background."""

    rgb: NDArray[np.uint8]
    depth: NDArray[np.float32]
    mask: NDArray[np.bool_]
    normals: NDArray[np.float32]


def _ray_directions(camera: Camera, cols: NDArray, rows: NDArray) -> NDArray[np.float64]:
    """World directions (..., 3) through the centres of pixels ``(cols, rows)`` (broadcast together),
    scaled to camera-frame z = 1."""
    m = camera.R.T @ np.linalg.inv(camera.K)
    return (np.asarray(cols) + 0.5)[..., None] * m[:, 0] + (np.asarray(rows) + 0.5)[..., None] * m[:, 1] + m[:, 2]


class Renderer(ABC):
    """Renders views of a mesh; subclasses give each pixel's hit face and barycentric weights."""

    name: str

    def __init__(self, config: RenderConfig | None = None) -> None:
        self.config = config or RenderConfig()

    @abstractmethod
    def _hits(self, mesh: trimesh.Trimesh, cameras: list[Camera]) -> list[Hit]:
        """Per camera: face id (H, W) (-1 = background), barycentric (H, W, 3), depth (H, W)."""

    def render_views(self, mesh: trimesh.Trimesh, cameras: list[Camera]) -> list[RenderOutput]:
        """Render every camera of one mesh (the mesh is prepared once for all of them)."""
        return [
            self._shade(mesh, cam, *hit) for cam, hit in zip(cameras, self._hits(mesh, cameras), strict=True)
        ]

    def render(self, mesh: trimesh.Trimesh, camera: Camera) -> RenderOutput:
        return self.render_views(mesh, [camera])[0]

    def _shade(
        self,
        mesh: trimesh.Trimesh,
        camera: Camera,
        face_ids: NDArray[np.int64],
        bary: NDArray[np.float64],
        depth: NDArray[np.float64],
    ) -> RenderOutput:
        cfg = self.config
        mask = face_ids >= 0
        rows, cols = np.nonzero(mask)
        d = _ray_directions(camera, cols, rows)
        d /= np.linalg.norm(d, axis=1, keepdims=True)
        faces = face_ids[mask]
        n = np.asarray(mesh.face_normals, dtype=np.float64)[faces]
        cos = np.einsum("ij,ij->i", n, d)
        n[cos > 0] *= -1.0
        light = cfg.ambient + cfg.diffuse * np.abs(cos)
        colors = surface_colors(mesh, faces, bary[mask]) * light[:, None]

        h, w = mask.shape
        rgb = np.empty((h, w, 3), dtype=np.uint8)
        rgb[:] = cfg.background
        rgb[mask] = np.clip(np.rint(colors), 0, 255).astype(np.uint8)
        normals = np.zeros((h, w, 3), dtype=np.float32)
        normals[mask] = n
        return RenderOutput(
            rgb=rgb, depth=np.where(mask, depth, 0.0).astype(np.float32), mask=mask, normals=normals
        )


class Open3DRenderer(Renderer):
    """Ray casting with Open3D's ``RaycastingScene`` (Embree), one ray per pixel centre."""

    name = "open3d"

    def _hits(self, mesh: trimesh.Trimesh, cameras: list[Camera]) -> list[Hit]:
        import open3d as o3d

        scene = o3d.t.geometry.RaycastingScene()
        scene.add_triangles(
            o3d.core.Tensor(np.asarray(mesh.vertices, dtype=np.float32)),
            o3d.core.Tensor(np.asarray(mesh.faces, dtype=np.uint32)),
        )
        out = []
        for cam in cameras:
            rays = np.empty((cam.height, cam.width, 6), dtype=np.float32)
            rays[..., :3] = cam.center
            rays[..., 3:] = _ray_directions(cam, np.arange(cam.width)[None, :], np.arange(cam.height)[:, None])
            hit = scene.cast_rays(o3d.core.Tensor(rays))
            depth = hit["t_hit"].numpy().astype(np.float64)  # ray parameter = camera z, as dirs have z = 1
            miss = ~np.isfinite(depth)
            face_ids = hit["primitive_ids"].numpy().astype(np.int64)
            face_ids[miss] = -1
            uv = hit["primitive_uvs"].numpy().astype(np.float64)  # Embree: p = (1-u-v) v0 + u v1 + v v2
            bary = np.stack([1.0 - uv[..., 0] - uv[..., 1], uv[..., 0], uv[..., 1]], axis=-1)
            out.append((face_ids, bary, np.where(miss, 0.0, depth)))
        return out


class PyTorch3DRenderer(Renderer):
    """Rasterization with PyTorch3D's ``MeshRasterizer`` (the paper's renderer).

    ``device`` defaults to CUDA when available, else the CPU (slow: pixels × faces).
    """

    name = "pytorch3d"

    def __init__(self, config: RenderConfig | None = None, device: str | None = None) -> None:
        super().__init__(config)
        self.device = device

    def _hits(self, mesh: trimesh.Trimesh, cameras: list[Camera]) -> list[Hit]:
        import torch
        from pytorch3d.renderer import MeshRasterizer, RasterizationSettings
        from pytorch3d.structures import Meshes
        from pytorch3d.utils import cameras_from_opencv_projection

        device = torch.device(self.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        meshes = Meshes(
            verts=[torch.as_tensor(np.asarray(mesh.vertices), dtype=torch.float32, device=device)],
            faces=[torch.as_tensor(np.asarray(mesh.faces), dtype=torch.int64, device=device)],
        )
        out = []
        for cam in cameras:
            cams = cameras_from_opencv_projection(
                R=torch.as_tensor(cam.R[None], dtype=torch.float32, device=device),
                tvec=torch.as_tensor(cam.t[None], dtype=torch.float32, device=device),
                camera_matrix=torch.as_tensor(cam.K[None], dtype=torch.float32, device=device),
                image_size=torch.tensor([[cam.height, cam.width]], device=device),
            )
            settings = RasterizationSettings(
                image_size=(cam.height, cam.width), blur_radius=0.0, faces_per_pixel=1
            )
            with torch.no_grad():
                frags = MeshRasterizer(cameras=cams, raster_settings=settings)(meshes)
            face_ids = frags.pix_to_face[0, :, :, 0].cpu().numpy().astype(np.int64)
            bary = frags.bary_coords[0, :, :, 0].cpu().numpy().astype(np.float64)
            depth = frags.zbuf[0, :, :, 0].cpu().numpy().astype(np.float64)
            out.append((face_ids, bary, depth))
        return out


def make_renderer(backend: str = "auto", config: RenderConfig | None = None) -> Renderer:
    """The renderer for ``backend``; "auto" is PyTorch3D when CUDA is available, else Open3D."""
    if backend not in BACKENDS:
        raise ValueError(f"render backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        import torch

        backend = "pytorch3d" if torch.cuda.is_available() else "open3d"
    return PyTorch3DRenderer(config) if backend == "pytorch3d" else Open3DRenderer(config)


# 4. the stage

_matrix = pa.list_(pa.list_(pa.float64()))
SCHEMA = pa.schema(
    [("instance_id", pa.string())]
    + [(c, pa.binary()) for c in ("render", "depth", "mask", "normal_map")]
    + [("K", _matrix), ("R", _matrix), ("t", pa.list_(pa.float64()))]
    + [(c, pa.int64()) for c in ("width", "height", "view_index")]
    + [(c, pa.float64()) for c in ("elevation_deg", "azimuth_deg", "depth_scale")]
    + [(c, pa.string()) for c in ("render_backend", "mesh_normalization", "synset_id", "model_id", "category")]
)


class Render(Stage):
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

    def model_rows(self, model: ModelEntry, mesh: trimesh.Trimesh, drops: Drops) -> list[dict]:
        """:meth:`run_model`'s rows with the model's ids and category; a failure drops the model into ``drops``."""
        ids = {"synset_id": model.synset_id, "model_id": model.model_id, "category": model.category}
        with drops.guard(f"{model.synset_id}/{model.model_id}"):
            return [{**row, **ids} for row in self.run_model(mesh, model.synset_id, model.model_id)]
        return []

    def process_shard(self, run: RunFolder, shard_index: int, drops: Drops) -> ShardOutput:
        """Render every model of the shard."""
        shard = load_plan(run).shards[shard_index]
        rows: list[dict] = []
        for model, mesh in shard_meshes(shard, self.name, drops):
            rows.extend(self.model_rows(model, mesh, drops))
        drops.check(len(shard.models))
        return ShardOutput(rows, {"backend": self.renderer.name})
