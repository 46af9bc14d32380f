"""load_mesh: materials, textures, broken input; surface_colors."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import trimesh
from PIL import Image

from pointvl.dataset.mesh import MeshError, face_colors, load_mesh, surface_colors
from pointvl.fixture import write_fixture

TEXTURE = np.array([[[255, 0, 0], [0, 255, 0]], [[0, 0, 255], [255, 255, 0]]], dtype=np.uint8)

OBJ = """mtllib m.mtl
v 0 0 0
v 1 0 0
v 1 1 0
v 0 1 0
v 0 0 1
vt 0 0
vt 1 0
vt 1 1
vt 0 1
vt 2 0
usemtl red
f 1 2 5
usemtl tex
f 1/1 2/2 3/3
f 1/1 3/3 4/4
usemtl blue
f 1 4 5
usemtl tex
f 2/1 3/5 5/4
"""

MTL = """newmtl red
Kd 1 0 0
newmtl blue
Kd 0 0 1
newmtl tex
Kd 0.5 0.5 0.5
map_Kd tex.png
"""


def _write(folder, obj: str = OBJ, mtl: str = MTL, texture: bool = True) -> str:
    (folder / "m.obj").write_text(obj)
    (folder / "m.mtl").write_text(mtl)
    if texture:
        Image.fromarray(TEXTURE).resize((8, 8), Image.NEAREST).save(folder / "tex.png")
    return str(folder / "m.obj")


def _face(mesh: trimesh.Trimesh, corners: list[list[float]]) -> int:
    """Index of the face with exactly these corners (in any order)."""
    target = sorted(map(tuple, corners))
    for i, tri in enumerate(mesh.triangles):
        if sorted(map(tuple, tri.tolist())) == target:
            return i
    raise AssertionError(f"no face {corners}")


def test_materials_become_face_colours_and_textures(tmp_path) -> None:
    mesh = load_mesh(_write(tmp_path))
    assert len(mesh.faces) == 5 and len(mesh.metadata["textures"]) == 1
    red = _face(mesh, [[0, 0, 0], [1, 0, 0], [0, 0, 1]])
    blue = _face(mesh, [[0, 0, 0], [0, 1, 0], [0, 0, 1]])
    assert face_colors(mesh)[red].tolist() == [255, 0, 0]
    assert face_colors(mesh)[blue].tolist() == [0, 0, 255]
    index = mesh.face_attributes["texture_index"]
    assert index[red] == -1 and index[blue] == -1 and (index == 0).sum() == 3
    tex = _face(mesh, [[0, 0, 0], [1, 0, 0], [1, 1, 0]])
    # a textured face's flat colour is its texture's mean
    assert np.allclose(face_colors(mesh)[tex], TEXTURE.reshape(-1, 3).mean(axis=0), atol=1)


def test_surface_colors_sample_the_texture_with_wrapping(tmp_path) -> None:
    mesh = load_mesh(_write(tmp_path))
    tex = _face(mesh, [[0, 0, 0], [1, 0, 0], [1, 1, 0]])  # uv (0,0) (1,0) (1,1)
    tiled = int(np.flatnonzero(mesh.face_attributes["texture_uv"][:, :, 0].max(axis=1) == 2)[0])
    corners = mesh.triangles[tex]
    # barycentric weights of uv (0.75, 0.25): the texture's bottom-right quadrant (v = 0 is the bottom row)
    uv = mesh.face_attributes["texture_uv"][tex]
    bary = np.linalg.solve(np.vstack([uv.T, np.ones(3)]), [0.75, 0.25, 1.0])
    assert np.allclose(bary @ corners, [0.75, 0.25, 0.0], atol=1e-6)
    assert np.allclose(surface_colors(mesh, np.array([tex]), bary[None]), [TEXTURE[1, 1]])
    # the face whose uv run to u = 2 tiles the texture: u = 1.25 samples like u = 0.25
    uv_t = mesh.face_attributes["texture_uv"][tiled].astype(np.float64)
    bary_t = np.linalg.solve(np.vstack([uv_t.T, np.ones(3)]), [1.25, 0.25, 1.0])
    assert np.all(bary_t >= 0)
    assert np.allclose(surface_colors(mesh, np.array([tiled]), bary_t[None]), [TEXTURE[1, 0]])
    # plain faces give their colour whatever the weights
    red = _face(mesh, [[0, 0, 0], [1, 0, 0], [0, 0, 1]])
    assert np.allclose(surface_colors(mesh, np.array([red]), np.array([[0.2, 0.3, 0.5]])), [[255, 0, 0]])


def test_missing_texture_falls_back_to_the_material_colour(tmp_path, caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="pointvl.dataset.mesh"):
        mesh = load_mesh(_write(tmp_path, texture=False))
    assert "tex.png" in caplog.text
    assert mesh.metadata["textures"] == [] and np.all(mesh.face_attributes["texture_index"] == -1)
    tex = _face(mesh, [[0, 0, 0], [1, 0, 0], [1, 1, 0]])
    assert face_colors(mesh)[tex].tolist() == [128, 128, 128]


def test_file_normals_are_kept(tmp_path) -> None:
    obj = "v 0 0 0\nv 1 0 0\nv 0 1 0\nvn 0 0.6 0.8\nf 1//1 2//1 3//1\n"
    mesh = load_mesh(_write(tmp_path, obj=obj, texture=False))
    assert mesh.metadata["has_file_normals"]
    assert np.allclose(mesh.vertex_normals, [[0, 0.6, 0.8]] * 3)
    plain = load_mesh(_write(tmp_path, obj="v 0 0 0\nv 1 0 0\nv 0 1 0\nf 1 2 3\n", texture=False))
    assert not plain.metadata["has_file_normals"]


@pytest.mark.parametrize(
    ("obj", "reason"),
    [
        (None, "missing_file"),
        ("v 0 0 0\nv 1 0 0\nv \x00\xff garbage\nf 1 2 3\n", "unreadable"),
        ("v 0 0 0\nv 1 0 0\nv 0 1 0\nf 1 2 99\n", "unreadable"),
        ("v 0 0 0\nv 1 0 0\nv 0 1 0\n", "no_faces"),
        ("", "no_vertices"),
        ("v 0 0 0\nv 1 0 nan\nv 0 1 0\nf 1 2 3\n", "non_finite"),
        ("v 0 0 0\nv 1 0 0\nv 2 0 0\nf 1 2 3\n", "degenerate"),
    ],
)
def test_broken_input_raises_mesh_error(tmp_path, obj: str | None, reason: str) -> None:
    path = tmp_path / "m.obj"
    if obj is not None:
        path.write_bytes(obj.encode("latin-1"))
    with pytest.raises(MeshError) as err:
        load_mesh(str(path))
    assert err.value.reason == reason
    assert isinstance(err.value, ValueError)


def test_fixture_models_load_with_their_texture(tmp_path) -> None:
    manifest = write_fixture(str(tmp_path / "shapenet"))
    synset, model = manifest.textured[0].split("/")
    mesh = load_mesh(str(tmp_path / "shapenet" / synset / model / "models" / "model_normalized.obj"))
    assert len(mesh.metadata["textures"]) == 1 and np.any(mesh.face_attributes["texture_index"] == 0)
    extent = mesh.bounds[1] - mesh.bounds[0]
    assert np.isclose(np.linalg.norm(extent), 1.0, atol=1e-3)  # ShapeNet v2 normalization survives loading
