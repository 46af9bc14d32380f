"""Timings of the two render backends on ShapeNet-sized meshes (called by ``make bench``).

Open3D ray casting at 512² on 20k and 80k faces: the first view of a mesh (which includes
building Embree's BVH, once per mesh) and each further view of the same mesh, as the stage
renders them. PyTorch3D: on a CPU it is
naive rasterization (pixels × faces, ~20 s for 20k faces at 512²), so it is timed there only at
256² on 20k faces; with CUDA it is also timed at 512² on 20k and 80k faces. Well under 2 minutes
on two cores.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import trimesh

    from pointvl.dataset.cameras import Camera
    from pointvl.dataset.renderers import Renderer

logger = logging.getLogger(__name__)

VIEWS = 4


def _per_view(renderer: Renderer, mesh: trimesh.Trimesh, cameras: list[Camera]) -> float:
    start = time.perf_counter()
    renderer.render_views(mesh, cameras)
    return (time.perf_counter() - start) / len(cameras)


def run() -> dict[str, float]:
    """``{name: seconds}`` for each backend/size/mesh combination measured here."""
    import torch

    from benchmarks.bench import shapenet_sized_mesh
    from pointvl.dataset.cameras import sample_cameras
    from pointvl.dataset.renderers import Open3DRenderer, PyTorch3DRenderer
    from pointvl.dataset.stages.render import RenderConfig

    results: dict[str, float] = {}
    meshes = {n: shapenet_sized_mesh(n * 1000) for n in (20, 80)}
    cfg512 = RenderConfig(width=512, height=512, views_per_model=VIEWS)
    cfg256 = RenderConfig(width=256, height=256, views_per_model=1)
    cams512 = sample_cameras("02958343", "bench", cfg512)
    cams256 = sample_cameras("02958343", "bench", cfg256)

    for n, mesh in meshes.items():
        renderer = Open3DRenderer(cfg512)
        renderer.render_views(mesh, cams512[:1])  # warm-up (thread pool, page faults)
        one = _per_view(renderer, mesh, cams512[:1])
        many = _per_view(renderer, mesh, cams512) * len(cams512)
        results[f"open3d_512px_{n}k_faces_first_view_s"] = one  # includes Embree's BVH build
        results[f"open3d_512px_{n}k_faces_next_view_s"] = (many - one) / (len(cams512) - 1)
        logger.info("open3d %dk faces 512px: first view %.3f s, next %.3f s", n, one, (many - one) / (VIEWS - 1))

    results["pytorch3d_cpu_256px_20k_faces_s_per_view"] = _per_view(
        PyTorch3DRenderer(cfg256, device="cpu"), meshes[20], cams256
    )
    if torch.cuda.is_available():
        gpu = PyTorch3DRenderer(cfg512, device="cuda")
        gpu.render_views(meshes[20], cams512[:1])  # warm-up (CUDA context, kernels)
        for n, mesh in meshes.items():
            results[f"pytorch3d_cuda_512px_{n}k_faces_s_per_view"] = _per_view(gpu, mesh, cams512)
    return results
