"""Clean at scale: listing, then validation in parallel on workers, cached per model and resumable."""

from __future__ import annotations

from pathlib import Path

from pointvl.core import io
from pointvl.dataset.clean import Clean, CleanConfig
from pointvl.dataset.executor import open_executor
from pointvl.dataset.shape_checks import validate_models
from pointvl.dataset.shapenet import list_models, model_path

CFG = CleanConfig(test_size=0.25, train_size=None)


def _entries(cache: Path) -> dict[str, int]:
    return {str(p.relative_to(cache)): p.stat().st_mtime_ns for p in cache.rglob("*.json")}


def test_listing_finds_every_model_folder_and_its_obj(shapenet):
    listed = {(s, m): info for s, _, models in list_models(shapenet.root) for m, _, info in models}
    assert set(listed) == {(s, m) for s, ids in shapenet.models.items() for m in ids}
    missing = {(f.synset_id, f.model_id) for f in shapenet.faults if f.reason == "missing_obj"}
    assert {k for k, info in listed.items() if info is None} == missing
    assert all(info["size"] > 0 for info in listed.values() if info is not None)


def test_parallel_cached_validation_gives_the_serial_result_and_resumes(shapenet, tmp_path):
    serial = Clean(CFG).run(shapenet.root, str(tmp_path / "serial.csv"))
    # what a clean killed half-way leaves behind: cache entries for the models it finished
    cache = tmp_path / "cache"
    todo = [(model_path(shapenet.root, s, m), io.file_key(info), f"{s}/{m}")
            for s, _, models in list_models(shapenet.root) for m, _, info in models if info is not None]
    validate_models(todo[: len(todo) // 2], str(cache))
    before = _entries(cache)
    assert len(before) == len(todo) // 2

    seen = []
    with open_executor(2) as executor:
        resumed = Clean(CFG).run(shapenet.root, str(tmp_path / "resumed.csv"), executor, str(cache), seen.append)
    assert resumed == serial
    assert (tmp_path / "resumed.csv").read_bytes() == (tmp_path / "serial.csv").read_bytes()
    after = _entries(cache)
    assert {k: after[k] for k in before} == before  # finished models were not validated again
    assert seen[-1].done == seen[-1].total > len(todo) // 2 and seen[-1].rate > 0 and "ETA" in seen[-1].line()

    # a changed OBJ (new size and mtime) is validated again; the others are not
    synset, model = serial[0].synset_id, serial[0].model_id
    obj = Path(serial[0].obj_path)
    obj.write_bytes(obj.read_bytes() + b"# edited\n")
    try:
        Clean(CFG).run(shapenet.root, str(tmp_path / "again.csv"), None, str(cache))
    finally:
        obj.write_bytes(obj.read_bytes().removesuffix(b"# edited\n"))
    again = _entries(cache)
    assert [k for k in again if again[k] != after[k]] == [f"{synset}/{model}.json"]
