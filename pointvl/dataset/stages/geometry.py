"""Stage `geometry`: the 3D targets of an instance from its point cloud (paper §4.1.3).

- ``bbox3d``: the axis-aligned box of the point cloud, ``[xmin, ymin, zmin, xmax, ymax, zmax]`` in
  the object's normalized frame (the frame the model sees the points in).
- ``kpts3d``: ``K`` farthest-point-sampled points of the cloud (Open3D's FPS starts from the first
  point, so the result is deterministic for a given cloud). Every keypoint lies on the sampled
  surface and therefore inside ``bbox3d``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import open3d as o3d
import pyarrow as pa

from pointvl.core.errors import check_range
from pointvl.dataset.run_folder import RunFolder
from pointvl.dataset.stages.base import (
    MATRIX3,
    Drops,
    Stage,
    matrix_column,
    read_stage_table,
    to_numpy_matrix,
    vector_column,
)


@dataclass
class GeometryConfig:
    """3D grounding targets (paper §4.1.3).

    Args:
        num_keypoints: FPS keypoints per instance (paper: 16).
    """

    num_keypoints: int = 16

    def __post_init__(self) -> None:
        check_range("geometry.num_keypoints", self.num_keypoints, 1, 1024, 16)


class Geometry(Stage):
    """Stage ``geometry``: ``bbox3d`` and ``kpts3d`` of each instance's point cloud."""

    name = "geometry"
    inputs = ("sample_points",)
    schema = pa.schema([("instance_id", pa.string()), ("bbox3d", pa.list_(pa.float32(), 6)), ("kpts3d", MATRIX3)])
    config_class = GeometryConfig

    def run_points(self, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Return ``(bbox3d (6,), kpts3d (K, 3))`` as float32 for an ``(N, 3)`` cloud."""
        k = self.config.num_keypoints
        if len(points) < k:
            raise ValueError(f"{len(points)} points cannot give {k} distinct keypoints")
        bbox3d = np.concatenate([points.min(axis=0), points.max(axis=0)]).astype(np.float32)
        pcd = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(points.astype(np.float64)))
        kpts3d = np.asarray(pcd.farthest_point_down_sample(k).points, dtype=np.float32)
        return bbox3d, kpts3d

    def rows(self, instance_ids: list[str], clouds: list[np.ndarray], drops: Drops) -> list[dict]:
        """One row (``instance_id``, ``bbox3d``, ``kpts3d``) per instance's ``(N, 3)`` cloud; a failure
        drops the instance into ``drops``."""
        rows = []
        for iid, cloud in zip(instance_ids, clouds, strict=True):
            with drops.guard(iid):
                box, kp = self.run_points(cloud)
                rows.append({"instance_id": iid, "bbox3d": box, "kpts3d": kp})
        drops.check(len(instance_ids))
        return rows

    def to_table(self, rows: list[dict] | pa.Table) -> pa.Table:
        return pa.table({
            "instance_id": pa.array([r["instance_id"] for r in rows], pa.string()),
            "bbox3d": vector_column([r["bbox3d"] for r in rows], 6),
            "kpts3d": matrix_column([r["kpts3d"] for r in rows], 3),
        })

    def process_shard(self, run: RunFolder, shard_index: int, drops: Drops) -> list[dict]:
        """Boxes and keypoints for every instance of the shard's point table."""
        points = read_stage_table(run, "sample_points", shard_index)
        clouds = [to_numpy_matrix(cell) for cell in points.column("points").to_pylist()]
        return self.rows(points.column("instance_id").to_pylist(), clouds, drops)
