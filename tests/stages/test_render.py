"""Render stage: cameras, both backends, projection consistency, textures, encodings."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import trimesh
from PIL import Image

from pointvl.core import images
from pointvl.core.geometry import camera_depth, project_points
from pointvl.dataset.mesh import load_mesh
from pointvl.dataset.stages.render import (
    Camera,
    Open3DRenderer,
    PyTorch3DRenderer,
    Render,
    RenderConfig,
    look_at,
    make_renderer,
    sample_cameras,
)

CAR, CHAIR = "02958343", "03001627"
SIZE = 112


def _scene() -> trimesh.Trimesh:
    """A box on a sphere (~350 faces), each part its own colour, in a unit-ish frame."""
    box = trimesh.creation.box(extents=(0.5, 0.2, 0.3))
    box.apply_translation((0.0, -0.15, 0.05))
    ball = trimesh.creation.icosphere(subdivisions=2, radius=0.18)
    ball.apply_translation((0.1, 0.1, -0.05))
    box.visual.face_colors = (200, 40, 40, 255)
    ball.visual.face_colors = (40, 90, 220, 255)
    return trimesh.util.concatenate([box, ball])


def _ellipsoid() -> trimesh.Trimesh:
    mesh = trimesh.creation.icosphere(subdivisions=3, radius=1.0)
    mesh.apply_scale((0.45, 0.25, 0.3))
    return mesh


@pytest.fixture(scope="module")
def cfg() -> RenderConfig:
    return RenderConfig(width=SIZE, height=SIZE, views_per_model=2)


@pytest.fixture(scope="module")
def both(cfg: RenderConfig):
    """Renders of the same cameras by both backends (PyTorch3D on the CPU: small image, few faces)."""
    mesh = _scene()
    cameras = sample_cameras(CHAIR, "m0", cfg) + sample_cameras("00000000", "m1", cfg)
    o3d_out = Open3DRenderer(cfg).render_views(mesh, cameras)
    p3d_out = PyTorch3DRenderer(cfg, device="cpu").render_views(mesh, cameras)
    return mesh, cameras, o3d_out, p3d_out


def test_backends_agree_on_the_same_camera(both) -> None:
    _, cameras, o3d_out, p3d_out = both
    for a, b in zip(o3d_out, p3d_out, strict=True):
        iou = (a.mask & b.mask).sum() / (a.mask | b.mask).sum()
        assert a.mask.sum() > 500 and iou >= 0.99
        overlap = a.mask & b.mask
        assert np.abs(a.depth[overlap] - b.depth[overlap]).max() < 1e-3
        assert np.all(a.depth[~a.mask] == 0) and np.all(b.depth[~b.mask] == 0)
        same_normal = np.all(np.abs(a.normals - b.normals) < 1e-4, axis=-1)[overlap]
        assert same_normal.mean() > 0.99
        rgb_diff = np.abs(a.rgb.astype(int) - b.rgb.astype(int))[overlap]
        assert rgb_diff.mean() < 1.0
        assert np.all(a.rgb[~a.mask] == 255) and np.all(b.rgb[~b.mask] == 255)


def test_normals_are_unit_world_normals_facing_the_camera(both) -> None:
    _, cameras, o3d_out, _ = both
    for cam, out in zip(cameras, o3d_out, strict=True):
        n = out.normals[out.mask]
        assert np.allclose(np.linalg.norm(n, axis=1), 1.0, atol=1e-5)
        # world normals turned towards the camera: in camera frame they point back (-z)
        assert np.all((n @ cam.R.T)[:, 2] <= 1e-6)


@pytest.mark.parametrize("backend", ["open3d", "pytorch3d"])
def test_pixel_centres_follow_the_schema(backend: str) -> None:
    """A square facing the camera whose edges project to x = 40.3 / 71.7: columns 40..71 exactly."""
    size = 112
    K = np.array([[100.0, 0, 56.0], [0, 100.0, 56.0], [0, 0, 1]])
    R, t = look_at(np.array([0.0, 0.0, -2.0]), np.zeros(3))
    cam = Camera(K, R, t, size, size, 0.0, 180.0, 0)
    # camera at -Z looking at +Z: camera x = world -x, so world x in [-(71.7-56)/50, (56-40.3)/50]
    x_lo, x_hi = -(71.7 - 56) / 50, (56 - 40.3) / 50
    y_lo, y_hi = -(66.2 - 56) / 50, (56 - 45.8) / 50  # camera y = world -y: rows 46..65
    quad = trimesh.Trimesh(
        vertices=[[x_lo, y_lo, 0], [x_hi, y_lo, 0], [x_hi, y_hi, 0], [x_lo, y_hi, 0]],
        faces=[[0, 1, 2], [0, 2, 3]],
        process=False,
    )
    r = Open3DRenderer() if backend == "open3d" else PyTorch3DRenderer(device="cpu")
    out = r.render(quad, cam)
    cols = np.flatnonzero(out.mask.any(axis=0))
    rows = np.flatnonzero(out.mask.any(axis=1))
    assert (cols[0], cols[-1], rows[0], rows[-1]) == (40, 71, 46, 65)
    assert np.allclose(out.depth[out.mask], 2.0, atol=1e-5)


@pytest.mark.parametrize("backend", ["open3d", "pytorch3d"])
def test_projected_surface_points_land_on_the_render(backend: str, cfg: RenderConfig) -> None:
    """Surface points (as kpts3d are) project into the mask; visible ones at the rendered depth."""
    mesh = _ellipsoid()
    points, face_idx = trimesh.sample.sample_surface(mesh, 400, seed=0)
    normals = mesh.face_normals[face_idx]
    r = Open3DRenderer(cfg) if backend == "open3d" else PyTorch3DRenderer(cfg, device="cpu")
    for cam in sample_cameras(CAR, "kp", cfg):
        out = r.render(mesh, cam)
        uv = project_points(points, cam.K, cam.R, cam.t)
        z = camera_depth(points, cam.R, cam.t)
        px = np.floor(uv).astype(int)
        assert np.all(z > 0) and np.all((px >= 0) & (px < SIZE))
        # the 3x3 pixels around each projection: their mask and rendered depth
        pad_mask, pad_depth = np.pad(out.mask, 1), np.pad(out.depth, 1)
        offsets = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
        near = np.stack([pad_mask[px[:, 1] + 1 + dy, px[:, 0] + 1 + dx] for dy, dx in offsets])
        near_depth = np.stack([pad_depth[px[:, 1] + 1 + dy, px[:, 0] + 1 + dx] for dy, dx in offsets])
        assert np.all(near.any(axis=0)), "a surface point projects more than a pixel off the mask"
        lo = np.where(near, near_depth, np.inf).min(axis=0)
        hi = np.where(near, near_depth, -np.inf).max(axis=0)
        # convex shape: a point is visible iff its normal faces the camera
        to_cam = cam.center - points
        facing = np.einsum("ij,ij->i", normals, to_cam) / np.linalg.norm(to_cam, axis=1)
        visible, hidden = facing > 0.3, facing < -0.3
        assert visible.sum() > 60 and hidden.sum() > 60
        # a visible point's depth lies between the rendered depths of the pixel centres around it
        assert np.all((z[visible] >= lo[visible] - 2e-3) & (z[visible] <= hi[visible] + 2e-3))
        # a hidden point lies behind the rendered surface
        assert np.all(z[hidden] > hi[hidden] + 0.02)


def test_category_adaptive_cameras() -> None:
    cfg = RenderConfig(views_per_model=3, elevation_deg=(15, 35))
    for i in range(20):
        for cam in sample_cameras(CAR, f"car{i}", cfg):
            c = cam.center
            assert abs(c[0]) > 1.5 * abs(c[2]), "car views must be side views (camera on +-X)"
            assert 15 <= cam.elevation_deg <= 35
            assert np.isclose(np.degrees(np.arcsin(c[1] / np.linalg.norm(c))), cam.elevation_deg)
            assert 60 <= abs(cam.azimuth_deg) <= 120
            assert np.allclose(cam.R @ cam.R.T, np.eye(3)) and np.isclose(np.linalg.det(cam.R), 1.0)
            assert camera_depth(np.zeros((1, 3)), cam.R, cam.t)[0] > 0
        for cam in sample_cameras(CHAIR, f"chair{i}", cfg):
            assert cam.center[2] < -abs(cam.center[0]) * 0.9, "chair views must see the front (-Z)"
    azimuths = [c.azimuth_deg for c in sample_cameras("99999999", "any", RenderConfig(views_per_model=8))]
    assert np.ptp(np.unwrap(np.radians(sorted(azimuths)))) > np.radians(270), "stratified over 360 degrees"


def test_cameras_are_deterministic_and_fit_the_object() -> None:
    cfg = RenderConfig(views_per_model=2, seed=3)
    a, b = sample_cameras(CAR, "abc", cfg), sample_cameras(CAR, "abc", cfg)
    assert all(np.array_equal(x.R, y.R) and np.array_equal(x.t, y.t) for x, y in zip(a, b, strict=True))
    other = sample_cameras(CAR, "abd", cfg)
    assert not np.allclose(a[0].R, other[0].R)
    reseeded = sample_cameras(CAR, "abc", RenderConfig(views_per_model=2, seed=4))
    assert not np.allclose(a[0].R, reseeded[0].R)
    # the bounding sphere of radius 0.5 projects inside the image with the margin
    cam = a[0]
    d = np.linalg.norm(cam.center)
    half = np.arctan(cfg.width / 2 / cam.K[0, 0])
    assert np.isclose(np.tan(np.arcsin(0.5 / d)), (1 - cfg.margin) * np.tan(half))


def test_textured_mesh_renders_its_texture(tmp_path) -> None:
    """A quad whose uv tile a 2x2 texture twice: the render shows a 4x4 checker of its colours."""
    texture = np.array([[[255, 0, 0], [0, 255, 0]], [[0, 0, 255], [255, 255, 0]]], dtype=np.uint8)
    Image.fromarray(texture).resize((32, 32), Image.NEAREST).save(tmp_path / "tex.png")
    (tmp_path / "m.mtl").write_text("newmtl t\nKd 0.5 0.5 0.5\nmap_Kd tex.png\n")
    (tmp_path / "m.obj").write_text(
        "mtllib m.mtl\nv -0.4 -0.4 0\nv 0.4 -0.4 0\nv 0.4 0.4 0\nv -0.4 0.4 0\n"
        "vt 0 0\nvt 2 0\nvt 2 2\nvt 0 2\nusemtl t\nf 1/1 2/2 3/3\nf 1/1 3/3 4/4\n"
    )
    mesh = load_mesh(str(tmp_path / "m.obj"))
    cfg = RenderConfig(width=96, height=96, ambient=1.0, diffuse=0.0)
    R, t = look_at(np.array([0.0, 0.0, 2.0]), np.zeros(3))  # from +Z: camera x = world x, y = -world y
    cam = Camera(np.array([[120.0, 0, 48], [0, 120.0, 48], [0, 0, 1]]), R, t, 96, 96, 0.0, 0.0, 0)
    # world x, y in [-0.4, 0.4] -> pixels 48 +- 24; each texture tile is 12 px wide
    for r in (Open3DRenderer(cfg), PyTorch3DRenderer(cfg, device="cpu")):
        out = r.render(mesh, cam)
        for i in range(4):
            for j in range(4):
                x, y = 24 + 12 * i + 6, 24 + 12 * j + 6  # tile centre; u grows with x, v grows with -y
                u, v = (i + 0.5) / 2, 2 - (j + 0.5) / 2
                texel = texture[int((1 - v % 1) * 2), int(u % 1 * 2)]
                assert np.array_equal(out.rgb[y, x], texel), (r.name, i, j)


def test_run_model_columns_and_encodings_round_trip() -> None:
    cfg = RenderConfig(width=80, height=64, views_per_model=2, backend="open3d")
    mesh = _scene()
    rows = Render(cfg).run_model(mesh, CAR, "m9")
    assert [r["instance_id"] for r in rows] == [f"{CAR}-m9-0", f"{CAR}-m9-1"]
    columns = {"render", "depth", "mask", "normal_map", "K", "R", "t", "width", "height", "view_index"}
    columns |= {"elevation_deg", "azimuth_deg", "depth_scale", "render_backend", "instance_id", "mesh_normalization"}
    assert set(rows[0]) == columns
    row = rows[1]
    assert row["render_backend"] == "open3d" and (row["width"], row["height"]) == (80, 64)
    cam = sample_cameras(CAR, "m9", cfg, center=tuple(mesh.bounds.mean(axis=0)),
                         radius=float(np.linalg.norm(mesh.vertices - mesh.bounds.mean(axis=0), axis=1).max()))[1]
    assert np.allclose(row["K"], cam.K) and np.allclose(row["R"], cam.R) and np.allclose(row["t"], cam.t)
    out = Open3DRenderer(cfg).render(mesh, cam)
    assert np.array_equal(images.decode_rgb(row["render"]), out.rgb)
    assert np.array_equal(images.decode_mask(row["mask"]), out.mask)
    depth = images.decode_depth(row["depth"], row["depth_scale"])
    assert np.abs(depth - out.depth).max() <= 0.5 / cfg.depth_scale + 1e-6
    normals = images.decode_normals(row["normal_map"])
    assert np.abs(normals - out.normals).max() < 2 / 255
    assert np.all(normals[~out.mask] == 0)


def test_encode_depth_refuses_overflow() -> None:
    with pytest.raises(ValueError, match="depth_scale"):
        images.encode_depth(np.full((2, 2), 70.0, dtype=np.float32), 1000.0)


def test_auto_backend_follows_the_device() -> None:
    assert make_renderer("auto").name == ("pytorch3d" if torch.cuda.is_available() else "open3d")
    with pytest.raises(ValueError, match="backend"):
        make_renderer("mitsuba")


@pytest.mark.parametrize(
    "kwargs",
    [{"width": 0}, {"elevation_deg": (40, 10)}, {"elevation_deg": (0, 90)}, {"backend": "x"}, {"margin": 1.0},
     {"depth_scale": 0}, {"ambient": 0.8, "diffuse": 0.5}, {"views_path": "/nonexistent/views.yaml"}],
)
def test_config_validation(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        RenderConfig(**kwargs)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_pytorch3d_on_cuda_agrees_with_open3d() -> None:
    cfg = RenderConfig(width=256, height=256, views_per_model=3)
    mesh = trimesh.creation.icosphere(subdivisions=5, radius=0.4)  # 20k faces
    cameras = sample_cameras(CAR, "gpu", cfg)
    for a, b in zip(Open3DRenderer(cfg).render_views(mesh, cameras),
                    PyTorch3DRenderer(cfg, device="cuda").render_views(mesh, cameras), strict=True):
        assert (a.mask & b.mask).sum() / (a.mask | b.mask).sum() >= 0.99
        overlap = a.mask & b.mask
        assert np.abs(a.depth[overlap] - b.depth[overlap]).max() < 1e-3
