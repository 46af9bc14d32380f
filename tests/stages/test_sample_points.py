import numpy as np
import pytest
import trimesh

from pointvl.dataset.stages.geometry import Geometry, GeometryConfig
from pointvl.dataset.stages.sample_points import SamplePoints, SamplePointsConfig


@pytest.fixture(scope="module")
def box() -> trimesh.Trimesh:
    return trimesh.creation.box(extents=(0.8, 0.3, 0.5))


def test_points_lie_on_the_surface_with_outward_normals(box):
    points, normals = SamplePoints(SamplePointsConfig(num_points=1024)).run_mesh(box, "m")
    assert points.shape == normals.shape == (1024, 3)
    assert points.dtype == np.float32
    # on the box's surface: inside it, and on one of its faces
    half = np.array([0.4, 0.15, 0.25])
    assert (np.abs(points) <= half + 1e-6).all()
    assert np.isclose(np.abs(points), half, atol=1e-5).any(axis=1).all()
    np.testing.assert_allclose(np.linalg.norm(normals, axis=1), 1.0, atol=1e-5)
    # on a box the KNN normal is the face normal; oriented away from the centre
    assert (np.einsum("ij,ij->i", points, normals) > 0).mean() > 0.95


def test_sampling_is_even_over_the_surface(box):
    points, _ = SamplePoints(SamplePointsConfig(num_points=2048)).run_mesh(box, "m")
    # Poisson-disk: the share of points on each face follows its area
    axis = np.argmax(np.abs(points) / np.array([0.4, 0.15, 0.25]), axis=1)
    areas = np.array([0.3 * 0.5, 0.8 * 0.5, 0.8 * 0.3]) * 2
    np.testing.assert_allclose(np.bincount(axis, minlength=3) / len(points), areas / areas.sum(), atol=0.03)


def test_seeded_and_deterministic(box):
    cfg = SamplePointsConfig(num_points=512, seed=1)
    a, _ = SamplePoints(cfg).run_mesh(box, "m1")
    b, _ = SamplePoints(cfg).run_mesh(box, "m1")
    c, _ = SamplePoints(cfg).run_mesh(box, "m2")
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_mesh_normals_are_used_when_the_file_has_them():
    sphere = trimesh.creation.icosphere(3)
    sphere.metadata["has_file_normals"] = True
    points, normals = SamplePoints(SamplePointsConfig(num_points=512)).run_mesh(sphere, "s")
    expected = points / np.linalg.norm(points, axis=1, keepdims=True)
    assert np.einsum("ij,ij->i", normals, expected).min() > 0.97


def test_geometry_box_and_keypoints(box):
    points, _ = SamplePoints(SamplePointsConfig(num_points=1024)).run_mesh(box, "m")
    bbox3d, kpts3d = Geometry(GeometryConfig()).run_points(points)
    np.testing.assert_array_equal(bbox3d, np.concatenate([points.min(0), points.max(0)]))
    assert kpts3d.shape == (16, 3)
    assert ((kpts3d >= bbox3d[:3]) & (kpts3d <= bbox3d[3:])).all()
    # every keypoint is one of the points, all distinct, and spread out: farthest-point sampling
    assert all((points == k).all(axis=1).any() for k in kpts3d)
    spread = np.linalg.norm(kpts3d[:, None] - kpts3d[None], axis=-1) + np.eye(16) * 9
    random = points[:16]
    random_spread = np.linalg.norm(random[:, None] - random[None], axis=-1) + np.eye(16) * 9
    assert spread.min() > random_spread.min()


def test_config_validation():
    with pytest.raises(ValueError, match="num_points"):
        SamplePointsConfig(num_points=4)
    with pytest.raises(ValueError, match="num_keypoints"):
        GeometryConfig(num_keypoints=0)
