"""Data moves by fsspec URL: a build into `memory://` writes the same shards as one into a local folder."""

import fsspec
import pyarrow.parquet as pq
import pytest

from pointvl.dataset.build_config import BuildConfig
from pointvl.dataset.runner import build_in_process

CONFIG = {"shard_size": 16, "clean": {"test_size": 0.25, "train_size": None, "categories": ["mug", "car"]},
          "sample_points": {"num_points": 256}, "render": {"width": 48, "height": 48}}


@pytest.mark.slow  # make test builds into a real s3:// URL (tests/scale/test_s3.py)
def test_a_build_into_an_fsspec_url_matches_a_local_one(shapenet, tmp_path):
    cfg = BuildConfig.from_dict(CONFIG)
    local = build_in_process(shapenet.root, str(tmp_path / "run"), cfg)
    remote = build_in_process(shapenet.root, "memory://pointvl-test/run", cfg, workers=0)
    fs = fsspec.filesystem("memory")
    assert [p.rsplit("/", 1)[1] for p in remote["shard_files"]] == [p.rsplit("/", 1)[1] for p in local["shard_files"]]
    for url, path in zip(remote["shard_files"], local["shard_files"], strict=True):
        with fs.open(url.removeprefix("memory://"), "rb") as f:
            remote_table = pq.read_table(f)
        assert remote_table.equals(pq.read_table(path))
    assert not fs.glob("/pointvl-test/run/**/.tmp-*")
    fs.rm("/pointvl-test", recursive=True)
