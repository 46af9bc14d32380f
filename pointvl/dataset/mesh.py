"""Load a ShapeNet ``model_normalized.obj`` into one coloured mesh, and colour surface points of it.

ShapeNet models mix many materials, some plain (``Kd``) and some textured (``map_Kd``), and their
texture coordinates often tile outside ``[0, 1]``. Packing them into one trimesh ``TextureVisuals``
atlas wraps each vertex's uv on its own and breaks tiled faces, so :func:`load_mesh` keeps the
textures beside the mesh instead:

- ``mesh.visual``: per-face colours (``Kd``; for a textured face the mean colour of its texture),
  read by :func:`face_colors`.
- ``mesh.face_attributes["texture_index"]``: ``(F,)`` int32, index into ``mesh.metadata["textures"]``
  or -1 for a plain face.
- ``mesh.face_attributes["texture_uv"]``: ``(F, 3, 2)`` float32 uv of each face corner (0 on plain
  faces).
- ``mesh.metadata["textures"]``: list of ``(H, W, 3)`` uint8 images.
- ``mesh.metadata["has_file_normals"]``: whether the OBJ carried ``vn`` normals; if so they are
  ``mesh.vertex_normals``.

:func:`surface_colors` is the one place that turns a surface point (face id + barycentric weights)
into a colour; every renderer calls it, so the backends colour the same hit the same way.
"""

from __future__ import annotations

import io
import logging
import os
import re

import numpy as np
import trimesh
from numpy.typing import NDArray

logger = logging.getLogger(__name__)

__all__ = ["MeshError", "face_colors", "load_mesh", "load_model", "normalize", "surface_colors"]

TEXTURE_INDEX = "texture_index"
TEXTURE_UV = "texture_uv"
TEXTURES = "textures"
HAS_FILE_NORMALS = "has_file_normals"
NORMALIZATION = "normalization"

# Coordinates beyond this are no real unit (a 100 m ship in millimetres is 1e5): overflow, not data.
MAX_COORDINATE = 1e9
# ShapeNet v2's model_normalized: bbox centred at the origin, bbox diagonal 1. Within these
# tolerances a mesh is taken as it is; outside them it is normalized the same way.
DIAGONAL_TOLERANCE = 0.05
CENTRE_TOLERANCE = 0.05
# A mesh whose vertices reach this many times farther than the bulk (98 %) of its surface carries
# stray faces (a triangle 200 units away): its box would shrink the object to a speck.
STRAY_FACTOR = 5.0
MIN_FACES = 4
"""Fewer faces (a lone triangle, a quad) bound no object: the smallest closed surface, a tetrahedron, has 4."""


class MeshError(ValueError):
    """A model that cannot be used; ``reason`` is a short code for the cleaning report.

    Codes: ``missing_file``, ``unreadable``, ``no_vertices``, ``no_faces``, ``non_finite``,
    ``out_of_range``, ``degenerate``, ``too_few_faces``, ``stray_geometry``.
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason


def _mtl_textures(obj_text: str, folder: str) -> dict[str, str]:
    """Material name -> ``map_Kd`` file name, read from the OBJ's ``mtllib`` files that exist."""
    textures: dict[str, str] = {}
    for line in obj_text.splitlines():
        if not line.startswith("mtllib"):
            continue
        path = os.path.join(folder, line[len("mtllib") :].strip())
        if not os.path.isfile(path):
            logger.warning("material library %s is missing; faces get the default colour", path)
            continue
        name = None
        with open(path, encoding="utf-8", errors="replace") as f:
            for mline in f:
                parts = mline.strip().split(maxsplit=1)
                if len(parts) == 2 and parts[0] == "newmtl":
                    name = parts[1]
                elif len(parts) == 2 and parts[0].lower() == "map_kd" and name is not None:
                    textures[name] = parts[1]
    return textures


def _image_rgb(image: object) -> NDArray[np.uint8]:
    """A PIL image (any mode) as ``(H, W, 3)`` uint8."""
    return np.asarray(image.convert("RGB"), dtype=np.uint8)  # type: ignore[attr-defined]


def _text_bytes(data: bytes) -> bytes:
    """OBJ bytes as UTF-8 without a byte-order mark (editors on Windows write UTF-8 BOM or UTF-16)."""
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        try:
            return data.decode("utf-16").encode("utf-8")
        except UnicodeDecodeError:
            return data  # not text after all: the NUL check reports it
    return data.removeprefix(b"\xef\xbb\xbf")


def load_mesh(obj_path: str) -> trimesh.Trimesh:
    """Load an OBJ with its materials as one triangle mesh (see the module docstring for colours).

    Per-material ``Kd`` colours become per-face colours; ``map_Kd`` textures are kept with per-corner
    uv so renderers sample them at the hit point. A texture that is referenced but missing, or a
    textured part without uv, falls back to the material colour with a logged warning. A vertex
    with several uv or normals is split into one vertex per combination (trimesh does this).

    Raises:
        MeshError: ``missing_file`` (no such file), ``unreadable`` (binary or unparsable),
            ``no_vertices``, ``no_faces``, ``non_finite`` (NaN/inf vertex), ``out_of_range`` (a face
            corner beyond ``MAX_COORDINATE``) or ``degenerate`` (all faces have zero area).
    """
    if not os.path.isfile(obj_path):
        raise MeshError("missing_file", f"{obj_path} does not exist")
    with open(obj_path, "rb") as f:
        data = _text_bytes(f.read())
    if b"\x00" in data:
        raise MeshError("unreadable", f"{obj_path} is binary, not an OBJ text file")
    folder = os.path.dirname(os.path.abspath(obj_path))
    text = data.decode("utf-8", errors="replace")
    expected_textures = _mtl_textures(text, folder)
    has_normals = re.search(r"^vn\s", text, flags=re.MULTILINE) is not None
    try:
        scene = trimesh.load_scene(
            io.BytesIO(data),
            file_type="obj",
            resolver=trimesh.resolvers.FilePathResolver(
                obj_path, allow_anywhere=True
            ),  # ShapeNet: ../images/
            process=False,
        )
        # an OBJ scene is flat (every transform is the identity); dump() would drop file normals
        parts = list(scene.geometry.values())
    except Exception as err:  # trimesh's parser fails with many exception types on corrupt input
        raise MeshError("unreadable", f"{obj_path}: {type(err).__name__}: {err}") from err

    meshes = [p for p in parts if isinstance(p, trimesh.Trimesh) and len(p.faces) > 0]
    if not meshes:
        has_vertices = any(len(p.vertices) > 0 for p in parts)
        reason = "no_faces" if has_vertices else "no_vertices"
        what = "vertices but no triangle faces" if has_vertices else "no vertices (empty or not an OBJ)"
        raise MeshError(reason, f"{obj_path} has {what}")

    vertices, normals, faces, colors, tex_index, tex_uv, images = [], [], [], [], [], [], []
    offset = 0
    for part in meshes:
        n_faces = len(part.faces)
        color = np.array([200, 200, 200], dtype=np.uint8)
        uv_faces = np.zeros((n_faces, 3, 2), dtype=np.float32)
        index = -1
        if isinstance(part.visual, trimesh.visual.TextureVisuals):
            material = part.visual.material
            color = np.asarray(material.main_color, dtype=np.uint8)[:3]
            image = getattr(material, "image", None)
            name = getattr(material, "name", None)
            if image is not None and part.visual.uv is not None:
                images.append(_image_rgb(image))
                index = len(images) - 1
                color = images[-1].reshape(-1, 3).mean(axis=0).astype(np.uint8)
                uv_faces = np.asarray(part.visual.uv, dtype=np.float32)[part.faces]
            elif image is not None:
                logger.warning("%s: material %s has a texture but no uv; using its Kd colour", obj_path, name)
            elif name in expected_textures:
                logger.warning(
                    "%s: texture %s of material %s is missing or unreadable; using its Kd colour",
                    obj_path,
                    expected_textures[name],
                    name,
                )
        else:
            color = np.asarray(part.visual.face_colors, dtype=np.uint8)[:, :3]
        vertices.append(np.asarray(part.vertices, dtype=np.float64))
        if has_normals:
            normals.append(np.asarray(part.vertex_normals, dtype=np.float64))
        faces.append(np.asarray(part.faces, dtype=np.int64) + offset)
        colors.append(np.broadcast_to(color, (n_faces, 3)))
        tex_index.append(np.full(n_faces, index, dtype=np.int32))
        tex_uv.append(uv_faces)
        offset += len(part.vertices)

    all_vertices = np.concatenate(vertices)
    if not np.all(np.isfinite(all_vertices)):
        raise MeshError("non_finite", f"{obj_path} has NaN or infinite vertex coordinates")
    all_faces = np.concatenate(faces)
    if all_faces.min() < 0 or all_faces.max() >= len(all_vertices):
        raise MeshError("unreadable", f"{obj_path} has a face index outside its {len(all_vertices)} vertices")
    if np.abs(all_vertices[all_faces]).max() > MAX_COORDINATE:
        raise MeshError("out_of_range", f"{obj_path} has a face corner beyond {MAX_COORDINATE:g} units")
    rgba = np.concatenate([np.concatenate(colors), np.full((len(all_faces), 1), 255, np.uint8)], axis=1)
    mesh = trimesh.Trimesh(
        vertices=all_vertices,
        faces=all_faces,
        face_colors=rgba,
        face_attributes={TEXTURE_INDEX: np.concatenate(tex_index), TEXTURE_UV: np.concatenate(tex_uv)},
        vertex_normals=np.concatenate(normals) if has_normals else None,
        metadata={TEXTURES: images, HAS_FILE_NORMALS: has_normals},
        process=False,
    )
    if not mesh.area > 0:
        raise MeshError("degenerate", f"{obj_path}: every face has zero area")
    logger.debug("loaded %s: %d faces, %d textures", obj_path, len(all_faces), len(images))
    return mesh


def _check_stray(mesh: trimesh.Trimesh, where: str) -> None:
    """Raise ``stray_geometry`` when the vertices reach far beyond the bulk of the surface."""
    weights = np.asarray(mesh.area_faces, dtype=np.float64)
    centres = np.asarray(mesh.triangles_center, dtype=np.float64)
    order = np.argsort(centres, axis=0)
    cdf = np.cumsum(weights[order], axis=0) / weights.sum()
    lo = np.take_along_axis(centres, order, 0)[np.argmax(cdf >= 0.01, axis=0), [0, 1, 2]]
    hi = np.take_along_axis(centres, order, 0)[np.argmax(cdf >= 0.99, axis=0), [0, 1, 2]]
    bulk = float(np.linalg.norm(hi - lo))
    full = float(np.linalg.norm(mesh.bounds[1] - mesh.bounds[0]))
    if full > STRAY_FACTOR * max(bulk, 1e-12 * full):
        raise MeshError(
            "stray_geometry",
            f"{where}: its box diagonal is {full:.4g} but 98 % of its surface spans {bulk:.4g}: "
            "stray faces far from the object (remove them from the OBJ)",
        )


def normalize(mesh: trimesh.Trimesh, where: str = "mesh") -> trimesh.Trimesh:
    """``mesh`` in ShapeNet v2's ``model_normalized`` frame (bbox centred at the origin, diagonal 1).

    Unreferenced vertices are removed first (they are not surface; they would only stretch the
    box). A mesh already normalized within ``DIAGONAL_TOLERANCE``/``CENTRE_TOLERANCE`` is kept as
    it is; any other (OBJ files from other tools come in arbitrary units) is translated and scaled
    uniformly, never rotated. ``mesh.metadata["normalization"]`` records what was done, for the
    records' provenance. Raises :class:`MeshError` ``too_few_faces`` (fewer than :data:`MIN_FACES`) or
    ``stray_geometry`` (see :func:`_check_stray`).
    """
    mesh.remove_unreferenced_vertices()
    if len(mesh.faces) < MIN_FACES:
        raise MeshError("too_few_faces", f"{where} has {len(mesh.faces)} faces, fewer than any object's surface "
                        f"({MIN_FACES}, a tetrahedron)")
    _check_stray(mesh, where)
    lo, hi = np.asarray(mesh.bounds, dtype=np.float64)
    centre, diagonal = (lo + hi) / 2, float(np.linalg.norm(hi - lo))
    as_is = abs(diagonal - 1.0) <= DIAGONAL_TOLERANCE and float(np.linalg.norm(centre)) <= CENTRE_TOLERANCE
    info: dict[str, object] = {"normalized": not as_is}
    if not as_is:
        scale = 1.0 / diagonal
        matrix = np.diag([scale, scale, scale, 1.0])
        matrix[:3, 3] = -centre * scale
        mesh.apply_transform(matrix)  # keeps the OBJ's own normals (a uniform scale does not turn them)
        info |= {"scale": float(f"{scale:.6g}"), "centre": [float(f"{c:.6g}") for c in centre],
                 "rule": "bbox centred at the origin, bbox diagonal 1 (ShapeNet v2 model_normalized)"}
        logger.info("%s is not unit-normalized (bbox diagonal %.4g, centre %s): normalized like ShapeNet v2",
                    where, diagonal, np.round(centre, 4).tolist())
    mesh.metadata[NORMALIZATION] = info
    return mesh


def load_model(obj_path: str) -> trimesh.Trimesh:
    """:func:`load_mesh`, then :func:`normalize`: the mesh every stage works on."""
    return normalize(load_mesh(obj_path), obj_path)


def face_colors(mesh: trimesh.Trimesh) -> NDArray[np.uint8]:
    """Per-face RGB ``(F, 3)`` uint8 of any trimesh mesh (textured faces: their texture's mean colour)."""
    if isinstance(mesh.visual, trimesh.visual.TextureVisuals):
        return np.asarray(mesh.visual.to_color().face_colors, dtype=np.uint8)[:, :3]
    return np.asarray(mesh.visual.face_colors, dtype=np.uint8)[:, :3]


def _sample_bilinear(image: NDArray[np.uint8], uv: NDArray[np.floating]) -> NDArray[np.float64]:
    """Bilinear samples of ``image`` at ``uv`` (OBJ convention: v = 0 at the bottom row), wrapping."""
    h, w = image.shape[:2]
    u = np.mod(uv[:, 0], 1.0)
    v = np.mod(uv[:, 1], 1.0)
    x = u * w - 0.5
    y = (1.0 - v) * h - 0.5
    x0, y0 = np.floor(x), np.floor(y)
    fx, fy = (x - x0)[:, None], (y - y0)[:, None]
    x0i, y0i = x0.astype(np.int64) % w, y0.astype(np.int64) % h
    x1i, y1i = (x0i + 1) % w, (y0i + 1) % h
    img = image.astype(np.float64)
    top = img[y0i, x0i] * (1 - fx) + img[y0i, x1i] * fx
    bottom = img[y1i, x0i] * (1 - fx) + img[y1i, x1i] * fx
    return top * (1 - fy) + bottom * fy


def surface_colors(
    mesh: trimesh.Trimesh, face_ids: NDArray[np.integer], bary: NDArray[np.floating]
) -> NDArray[np.float64]:
    """RGB in ``[0, 255]`` (N, 3) of the surface points ``sum_k bary[:, k] * corner_k`` of faces ``face_ids``.

    Plain faces give their face colour; faces textured by :func:`load_mesh` sample the texture
    (bilinear, uv wrapping) at the interpolated uv.
    """
    colors = face_colors(mesh)[face_ids].astype(np.float64)
    textures = mesh.metadata.get(TEXTURES, [])
    if not textures or TEXTURE_INDEX not in mesh.face_attributes:
        return colors
    index = np.asarray(mesh.face_attributes[TEXTURE_INDEX])[face_ids]
    corner_uv = np.asarray(mesh.face_attributes[TEXTURE_UV], dtype=np.float64)[face_ids]
    for i, image in enumerate(textures):
        sel = index == i
        if np.any(sel):
            uv = np.einsum("nk,nkc->nc", bary[sel], corner_uv[sel])
            colors[sel] = _sample_bilinear(image, uv)
    return colors
