"""Two renderers that give the same images for the same camera.

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

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import trimesh
from numpy.typing import NDArray

from pointvl.dataset.cameras import Camera
from pointvl.dataset.mesh import surface_colors

BACKENDS = ("auto", "open3d", "pytorch3d")

Hit = tuple[NDArray[np.int64], NDArray[np.float64], NDArray[np.float64]]  # face ids, barycentric, depth


class Shading(Protocol):
    """The fields of :class:`pointvl.dataset.stages.render.RenderConfig` a renderer reads."""

    ambient: float
    diffuse: float
    background: tuple[int, int, int]


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

    def __init__(self, config: Shading) -> None:
        self.config = config

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

    def __init__(self, config: Shading, device: str | None = None) -> None:
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


def make_renderer(backend: str, config: Shading) -> Renderer:
    """The renderer for ``backend``; "auto" is PyTorch3D when CUDA is available, else Open3D."""
    if backend not in BACKENDS:
        raise ValueError(f"render backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        import torch

        backend = "pytorch3d" if torch.cuda.is_available() else "open3d"
    return PyTorch3DRenderer(config) if backend == "pytorch3d" else Open3DRenderer(config)
