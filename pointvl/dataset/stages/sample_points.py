"""Stage `sample_points`: mesh → Poisson-disk point cloud with normals (paper §4.1.1).

Open3D's ``sample_points_poisson_disk`` (sample elimination over ``init_factor × N`` uniform
samples) spreads the points evenly over the surface. The mesh's vertex normals are interpolated
when the OBJ has them; otherwise normals are estimated from the k nearest neighbours and oriented
away from the box centre (ShapeNet meshes are closed-ish shells around their centre; a KNN normal's
sign is otherwise arbitrary).
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass

import numpy as np
import open3d as o3d
import pyarrow as pa
import trimesh

from pointvl.core.errors import check_range
from pointvl.dataset.plan import ModelEntry, instance_id, load_plan
from pointvl.dataset.run_folder import RunFolder
from pointvl.dataset.stages.base import MATRIX3, Drops, Stage, matrix_column, shard_meshes

logger = logging.getLogger(__name__)


@dataclass
class SamplePointsConfig:
    """Point-cloud sampling (paper §4.1.1).

    Args:
        num_points: points per model (N). The paper's value was lost in extraction; 8192 is
            PointLLM's and Point-BERT's input size.
        init_factor: Poisson-disk initial oversampling factor (paper: 5).
        knn: neighbours for normal estimation when the mesh has no normals (paper: KNN; k=30).
        use_mesh_normals: interpolate the OBJ's own vertex normals when it has them.
        seed: seeds Open3D's sampler (mixed with the model id, so each model is reproducible alone).
    """

    num_points: int = 8192
    init_factor: int = 5
    knn: int = 30
    use_mesh_normals: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        check_range("sample_points.num_points", self.num_points, 16, 262_144, 8192, "16 keypoints are drawn")
        check_range("sample_points.init_factor", self.init_factor, 1, 50, 5)
        check_range("sample_points.knn", self.knn, 3, 1000, 30, "3 points fit a plane")


def model_seed(seed: int, model_id: str) -> int:
    """A 31-bit seed from the config seed and a model id (stable across processes)."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{model_id}".encode()).digest()[:4], "little") & 0x7FFFFFFF


class SamplePoints(Stage):
    """Stage ``sample_points``: one point cloud per model, repeated for each of its views."""

    name = "sample_points"
    schema = pa.schema([("instance_id", pa.string()), ("points", MATRIX3), ("normals", MATRIX3)])
    config_class = SamplePointsConfig

    def run_mesh(self, mesh: trimesh.Trimesh, model_id: str) -> tuple[np.ndarray, np.ndarray]:
        """Return ``(points, normals)``, both ``(N, 3) float32``, deterministic for (seed, model_id)."""
        cfg = self.config
        o3d_mesh = o3d.geometry.TriangleMesh(
            o3d.utility.Vector3dVector(np.array(mesh.vertices, dtype=np.float64)),
            o3d.utility.Vector3iVector(np.array(mesh.faces, dtype=np.int32)),
        )
        # pointvl.dataset.mesh.load_mesh records whether the OBJ carried its own `vn` normals.
        if cfg.use_mesh_normals and mesh.metadata.get("has_file_normals", False):
            o3d_mesh.vertex_normals = o3d.utility.Vector3dVector(np.array(mesh.vertex_normals, dtype=np.float64))
        o3d.utility.random.seed(model_seed(cfg.seed, model_id))
        pcd = o3d_mesh.sample_points_poisson_disk(cfg.num_points, init_factor=cfg.init_factor)
        if not pcd.has_normals():
            pcd.estimate_normals(o3d.geometry.KDTreeSearchParamKNN(cfg.knn))
            centre = (np.asarray(mesh.bounds[0]) + np.asarray(mesh.bounds[1])) / 2
            points, normals = np.asarray(pcd.points), np.asarray(pcd.normals)
            flip = np.einsum("ij,ij->i", points - centre, normals) < 0
            normals[flip] *= -1
            pcd.normals = o3d.utility.Vector3dVector(normals)
        points = np.asarray(pcd.points, dtype=np.float32)
        normals = np.asarray(pcd.normals, dtype=np.float32)
        normals /= np.maximum(np.linalg.norm(normals, axis=1, keepdims=True), 1e-12)
        return points, normals

    def model_rows(self, model: ModelEntry, mesh: trimesh.Trimesh, views_per_model: int, drops: Drops) -> list[dict]:
        """One row per view of ``model`` (every view shares the model's cloud); a failed sampling drops
        the model into ``drops`` and gives no rows."""
        with drops.guard(f"{model.synset_id}/{model.model_id}"):
            pts, nrm = self.run_mesh(mesh, model.model_id)
            if len(pts) < 16 or not np.isfinite(pts).all() or not np.isfinite(nrm).all():
                raise ValueError(f"sampling gave {len(pts)} points (or non-finite ones)")
            return [{"instance_id": instance_id(model.synset_id, model.model_id, view), "points": pts, "normals": nrm}
                    for view in range(views_per_model)]
        return []

    def to_table(self, rows: list[dict] | pa.Table) -> pa.Table:
        return pa.table({
            "instance_id": pa.array([r["instance_id"] for r in rows], pa.string()),
            "points": matrix_column([r["points"] for r in rows], 3),
            "normals": matrix_column([r["normals"] for r in rows], 3),
        })

    def process_shard(self, run: RunFolder, shard_index: int, drops: Drops) -> list[dict]:
        """Sample every model of the shard."""
        shard = load_plan(run).shards[shard_index]
        rows: list[dict] = []
        for model, mesh in shard_meshes(shard, self.name, drops):
            rows.extend(self.model_rows(model, mesh, shard.views_per_model, drops))
        drops.check(len(shard.models))
        return rows
