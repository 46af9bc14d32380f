"""The benchmark record: one row per instance (``schemas/record.schema.json`` is the contract).

:func:`record_schema` is the same contract as Hugging Face ``datasets`` features: the shards carry
them in their Arrow schema metadata (``huggingface``), so ``datasets.load_dataset("parquet", ...)``
decodes the PNG columns as images and the arrays with their fixed shapes. The features are written
here in ``datasets``' own serialised form, so the build needs pyarrow only, not ``datasets``
(``tests/test_record.py`` checks them against ``datasets.Features``).
"""

from __future__ import annotations

import json
from typing import Any

import pyarrow as pa

IMAGE_COLUMNS = ("render", "refined", "image", "mask", "depth", "normal_map")

_ARROW = {"string": pa.string(), "int32": pa.int32(), "float32": pa.float32(), "float64": pa.float64(),
          "bool": pa.bool_()}
_IMAGE = pa.struct({"bytes": pa.binary(), "path": pa.string()})


def _value(dtype: str) -> dict[str, Any]:
    return {"dtype": dtype, "_type": "Value"}


def _vector(length: int, dtype: str = "float32") -> dict[str, Any]:
    return {"feature": _value(dtype), "length": length, "_type": "List"}


def _matrix(width: int, dtype: str = "float32", rows: int = -1) -> dict[str, Any]:
    inner = _vector(width, dtype)
    return {"feature": inner, "_type": "List"} if rows == -1 else {"feature": inner, "length": rows, "_type": "List"}


def record_features(num_keypoints: int = 16) -> dict[str, dict[str, Any]]:
    """The record's features as ``datasets.Features.to_dict()`` writes them; keypoint counts are
    fixed per build (paper: 16)."""
    string, float32 = _value("string"), _value("float32")
    return {
        "instance_id": string, "synset_id": string, "model_id": string, "category": string, "split": string,
        "view_index": _value("int32"),
        "points": _matrix(3),
        "normals": _matrix(3),
        **{name: {"_type": "Image"} for name in IMAGE_COLUMNS},
        "depth_scale": float32,
        "K": _matrix(3, "float64", 3),
        "R": _matrix(3, "float64", 3),
        "t": _vector(3, "float64"),
        "width": _value("int32"),
        "height": _value("int32"),
        "elevation_deg": float32,
        "azimuth_deg": float32,
        "bbox2d": _vector(4),
        "bbox3d": _vector(6),
        "kpts2d": _matrix(2, rows=num_keypoints),
        "kpts3d": _matrix(3, rows=num_keypoints),
        "qa": string,
        "description": string,
        "bbox2d_mask": _vector(4),
        "bbox2d_vlm": _vector(4),
        "vlm_agreement": float32,
        "drift": float32,
        "flagged": _value("bool"),
        "provenance": string,
    }


def _arrow_type(feature: dict[str, Any]) -> pa.DataType:
    """``datasets``' Arrow type of a feature: a ``List`` with a length is a fixed-size list."""
    kind = feature["_type"]
    if kind == "Value":
        return _ARROW[feature["dtype"]]
    if kind == "Image":
        return _IMAGE
    item = _arrow_type(feature["feature"])
    length = feature.get("length", -1)
    return pa.list_(item) if length == -1 else pa.list_(item, length)


def record_schema(num_keypoints: int = 16) -> pa.Schema:
    """The shards' Arrow schema, with the features in its ``huggingface`` metadata."""
    features = record_features(num_keypoints)
    metadata = {"huggingface": json.dumps({"info": {"features": features}})}
    return pa.schema([pa.field(name, _arrow_type(f)) for name, f in features.items()], metadata=metadata)
