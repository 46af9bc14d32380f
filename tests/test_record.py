"""The record schema the build writes with pyarrow alone is exactly what ``datasets`` makes of its features."""

import datasets
import pytest

from pointvl.core.record import record_features, record_schema


@pytest.mark.parametrize("num_keypoints", [16, 5])
def test_the_schema_equals_datasets_own(num_keypoints):
    features = datasets.Features.from_dict(record_features(num_keypoints))
    ours = record_schema(num_keypoints)
    assert ours.equals(features.arrow_schema, check_metadata=True)
    assert ours.metadata == features.arrow_schema.metadata  # byte for byte: the shards' footer
    assert features.to_dict() == record_features(num_keypoints)
    assert datasets.Features.from_arrow_schema(ours) == features
