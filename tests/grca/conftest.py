"""Shared fixtures: a camera, a target consistent with it, and a byte-level BPE tokenizer built in code."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from benchmarks.bench_grca import sample_outputs, train_toy_tokenizer
from pointvl.core.spatial import project_box3d


@pytest.fixture(scope="session")
def camera() -> dict[str, Any]:
    f, w, h = 300.0, 320, 240
    yaw = 0.4
    c, s = np.cos(yaw), np.sin(yaw)
    return {"K": np.array([[f, 0, w / 2], [0, f, h / 2], [0, 0, 1.0]]),
            "R": np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]]), "t": np.array([0.0, 0.1, 3.0]),
            "width": w, "height": h}


@pytest.fixture(scope="session")
def target(camera: dict[str, Any]) -> dict[str, Any]:
    """A target whose bbox2d is the projection of its bbox3d (so a perfect output has RPC close to 1)."""
    b3 = np.array([-0.5, -0.4, -0.3, 0.5, 0.4, 0.3])
    b2 = project_box3d(b3, camera["K"], camera["R"], camera["t"])
    assert b2 is not None and b2[0] > 0 and b2[2] < camera["width"] and b2[3] < camera["height"]
    return {"bbox2d": b2, "bbox3d": b3, "answer": "Chair"}


@pytest.fixture(scope="session")
def tokenizer() -> Any:
    return train_toy_tokenizer(sample_outputs(150, np.random.default_rng(123), 320, 240), vocab_size=300)
