"""What clean checks of each mesh: it loads and normalizes (the drop reason when it does not), its geometry
hash, and a shape descriptor that finds the same shape in another file format, vertex order or unit."""

from __future__ import annotations

import functools
import hashlib
import logging
from pathlib import Path

import numpy as np
import trimesh

from pointvl.core import io
from pointvl.core.errors import ITEM_ERRORS
from pointvl.dataset import mesh as mesh_module
from pointvl.dataset.mesh import NORMALIZATION, MeshError, load_model_file

logger = logging.getLogger(__name__)


def geometry_hash(vertices: np.ndarray, faces: np.ndarray) -> str:
    """Hash of the exact geometry (vertex coordinates and face indices), ignoring materials."""
    h = hashlib.sha256(np.ascontiguousarray(vertices, dtype=np.float64).tobytes())
    h.update(np.ascontiguousarray(faces, dtype=np.int64).tobytes())
    return h.hexdigest()


SHAPE_TOLERANCE = 1e-4
"""Two meshes whose :func:`shape_descriptor` entries all differ by less than this (unit-diagonal frame) are
one shape: conversions to float32 or 6-digit text move them by ~1e-6, distinct shapes by far more."""


def shape_descriptor(mesh: trimesh.Trimesh) -> list[float]:
    """What identifies a normalized mesh's shape whatever file it came from: the square root of its surface
    area, the area-weighted centroid and second moments of its surface (exact integrals over the triangles,
    per unit area) and its box extents, 13 numbers. The same for any vertex order, duplicated or unused
    vertices, winding, float precision and way a polygon was split into triangles; a mirror image differs
    (its centroid). ``∫ x xᵀ dA`` over a triangle ``a, b, c`` is ``A/12 (a aᵀ + b bᵀ + c cᵀ + s sᵀ)``, ``s = a+b+c``."""
    tri = np.asarray(mesh.triangles, dtype=np.float64)
    area = 0.5 * np.linalg.norm(np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]), axis=1)
    total = float(area.sum())
    s = tri.sum(axis=1)
    centroid = (area[:, None] * s).sum(axis=0) / (3 * total)
    second = np.einsum("f,fki,fkj->ij", area, tri, tri) + np.einsum("f,fi,fj->ij", area, s, s)
    upper = (second / (12 * total))[np.triu_indices(3)]
    extents = np.asarray(mesh.bounds[1] - mesh.bounds[0], dtype=np.float64)
    return [round(float(v), 9) for v in (np.sqrt(total), *centroid, *upper, *extents)]


def same_shapes(descriptors: list[list[float]]) -> dict[int, int]:
    """``{i: j}``: descriptor ``i`` is within :data:`SHAPE_TOLERANCE` of the earlier kept ``j`` (every
    descriptor not in it is kept; the first of each group stays)."""
    from scipy.spatial import cKDTree

    if len(descriptors) < 2:
        return {}
    near: dict[int, list[int]] = {}
    for i, j in cKDTree(np.asarray(descriptors)).query_pairs(SHAPE_TOLERANCE, p=np.inf):
        near.setdefault(max(i, j), []).append(min(i, j))
    same: dict[int, int] = {}
    for i in sorted(near):
        kept = [j for j in sorted(near[i]) if j not in same]
        if kept:
            same[i] = kept[0]
    return same


@functools.cache
def _loader_version() -> str:
    """The mesh loader's source: a changed loader (new checks) invalidates cached validations."""
    return hashlib.sha256(Path(mesh_module.__file__).read_bytes()).hexdigest()[:16]


def validate_models(items: list[tuple[str, str, str]], cache_dir: str | None) -> list[tuple[str, str, str, list]]:
    """``(reason, geometry hash, note, shape descriptor)`` of each ``(obj path, file key, cache name)``;
    reason "" = usable.

    Runs on a worker. With ``cache_dir``, a model's result is stored as ``<cache name>.json`` and reused
    while the file key and the loader are the same, so a killed clean resumes where it stopped and a
    re-clean only loads new or changed models.
    """
    out = []
    for obj, key, name in items:
        entry = io.join(cache_dir, f"{name}.json") if cache_dir else None
        if entry and io.exists(entry):
            try:
                cached = io.read_json(entry, max_bytes=1 << 20)
            except ValueError:  # a damaged cache entry: validate again
                cached = None
            if (isinstance(cached, dict) and cached.get("key") == key and cached.get("loader") == _loader_version()
                    and "shape" in cached):
                out.append((cached["reason"], cached["geometry"], cached["note"], cached["shape"]))
                continue
        try:
            mesh = load_model_file(obj)
        except MeshError as err:
            result = (err.reason, "", str(err), [])
        except ITEM_ERRORS as err:  # a mesh no check foresaw: it costs only itself
            logger.warning("%s: %s: %s", name, type(err).__name__, err)
            result = ("unreadable", "", f"{type(err).__name__}: {err}", [])
        else:
            norm = mesh.metadata[NORMALIZATION]
            note = f"normalized like model_normalized (scale {norm['scale']:g})" if norm["normalized"] else ""
            result = ("", geometry_hash(mesh.vertices, mesh.faces), note, shape_descriptor(mesh))
        if entry:
            io.write_json(entry, {"key": key, "loader": _loader_version(), "reason": result[0],
                                  "geometry": result[1], "note": result[2], "shape": result[3]})
        out.append(result)
    return out
