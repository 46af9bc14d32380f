"""A tiny benchmark shard folder in the record contract (schemas/README.md), for the training tests.

The camera sits on the object's front (-Z) side looking along +Z, and bbox2d is the projection of
bbox3d: a perfect prediction scores 1 on every geometric metric, RPC included.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from pointvl.core import io as pio
from pointvl.core.images import encode_rgb
from pointvl.core.spatial import box3d_corners, project_box3d, project_points

CATEGORIES = ("chair", "table", "car", "lamp")


def make_record(i: int, split: str, size: int = 56, n_points: int = 300, n_kpts: int = 16) -> dict:
    rng = np.random.default_rng(i)
    half = rng.uniform(0.2, 0.5, size=3)
    bbox3d = np.concatenate([-half, half])
    points = rng.uniform(-half, half, size=(n_points, 3)).astype(np.float32)
    K = np.array([[size, 0, size / 2], [0, size, size / 2], [0, 0, 1]], dtype=np.float64)
    R = np.eye(3)
    t = np.array([0.0, 0.0, 2.5])
    bbox2d = project_box3d(bbox3d, K, R, t)
    kpts3d = box3d_corners(bbox3d)[np.arange(n_kpts) % 8] * 0.9
    kpts2d = project_points(kpts3d, K, R, t)
    category = CATEGORIES[i % len(CATEGORIES)]
    image = np.zeros((size, size, 3), dtype=np.uint8)
    x1, y1, x2, y2 = np.round(bbox2d).astype(int)
    image[y1:y2, x1:x2] = rng.integers(60, 255, size=3)
    qa = [{"question": "What is the object?", "choices": list(CATEGORIES), "answer": category}]
    return {
        "instance_id": f"0300{i:04d}-m{i}-0",
        "synset_id": f"0300{i:04d}",
        "model_id": f"m{i}",
        "category": category,
        "split": split,
        "points": points.tolist(),
        "normals": np.tile([0.0, 1.0, 0.0], (n_points, 1)).astype(np.float32).tolist(),
        "render": encode_rgb(image),
        "refined": encode_rgb(image),
        "image": encode_rgb(image),
        "mask": b"",
        "depth": b"",
        "K": K.tolist(),
        "R": R.tolist(),
        "t": t.tolist(),
        "width": size,
        "height": size,
        "bbox2d": bbox2d.tolist(),
        "bbox3d": bbox3d.tolist(),
        "kpts2d": kpts2d.tolist(),
        "kpts3d": kpts3d.tolist(),
        "qa": json.dumps(qa),
        "description": f"A small {category} with a plain box shape.",
        "provenance": json.dumps({"backend": "test"}),
    }


def write_shards(root: Path, counts: dict[str, int], per_shard: int = 4, n_kpts: int = 16) -> str:
    """Write ``{split}-{i:05d}-of-{n:05d}.parquet`` files with ``counts[split]`` records each split."""
    out = str(root / "shards")
    start = 0
    for split, count in counts.items():
        n = -(-count // per_shard)
        for s in range(n):
            ids = range(start + s * per_shard, start + min(count, (s + 1) * per_shard))
            rows = [make_record(j, split, n_kpts=n_kpts) for j in ids]
            pio.write_table(pio.join(out, f"{split}-{s:05d}-of-{n:05d}.parquet"), pa.Table.from_pylist(rows))
        start += count
    return out


@pytest.fixture(scope="session")
def shards_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return write_shards(tmp_path_factory.mktemp("bench"), {"train": 8, "test": 4})


@pytest.fixture(scope="session")
def short_shards_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One train and one test record with 2 keypoints: a target the tiny model memorises in seconds."""
    return write_shards(tmp_path_factory.mktemp("short"), {"train": 1, "test": 1}, n_kpts=2)
