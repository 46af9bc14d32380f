"""The benchmark record: one row per instance (``schemas/record.schema.json`` is the contract).

``RECORD_FEATURES`` is the same contract as Hugging Face ``datasets`` features: the shards carry
them in their Arrow schema metadata, so ``datasets.load_dataset("parquet", ...)`` decodes the PNG
columns as images and the arrays with their fixed shapes.
"""

from __future__ import annotations

import datasets

IMAGE_COLUMNS = ("render", "refined", "image", "mask", "depth", "normal_map")


def _float_matrix(width: int, dtype: str = "float32", rows: int = -1) -> datasets.List:
    return datasets.List(datasets.List(datasets.Value(dtype), length=width), length=rows)


def _float_vector(length: int, dtype: str = "float32") -> datasets.List:
    return datasets.List(datasets.Value(dtype), length=length)


def record_features(num_keypoints: int = 16) -> datasets.Features:
    """The record's features; keypoint counts are fixed per build (paper: 16)."""
    return datasets.Features({
        "instance_id": datasets.Value("string"),
        "synset_id": datasets.Value("string"),
        "model_id": datasets.Value("string"),
        "category": datasets.Value("string"),
        "split": datasets.Value("string"),
        "view_index": datasets.Value("int32"),
        "points": _float_matrix(3),
        "normals": _float_matrix(3),
        **{name: datasets.Image() for name in IMAGE_COLUMNS},
        "depth_scale": datasets.Value("float32"),
        "K": _float_matrix(3, "float64", 3),
        "R": _float_matrix(3, "float64", 3),
        "t": _float_vector(3, "float64"),
        "width": datasets.Value("int32"),
        "height": datasets.Value("int32"),
        "elevation_deg": datasets.Value("float32"),
        "azimuth_deg": datasets.Value("float32"),
        "bbox2d": _float_vector(4),
        "bbox3d": _float_vector(6),
        "kpts2d": _float_matrix(2, rows=num_keypoints),
        "kpts3d": _float_matrix(3, rows=num_keypoints),
        "qa": datasets.Value("string"),
        "description": datasets.Value("string"),
        "bbox2d_mask": _float_vector(4),
        "bbox2d_vlm": _float_vector(4),
        "vlm_agreement": datasets.Value("float32"),
        "drift": datasets.Value("float32"),
        "flagged": datasets.Value("bool"),
        "provenance": datasets.Value("string"),
    })
