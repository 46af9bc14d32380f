import csv
from pathlib import Path

import pytest

from pointvl.core.errors import InputError
from pointvl.dataset.clean import Clean, CleanConfig
from pointvl.dataset.shapenet import read_taxonomy


def _report(path: Path) -> dict[tuple[str, str], dict]:
    with open(path) as f:
        return {(r["synset_id"], r["model_id"]): r for r in csv.DictReader(f)}


def test_every_fixture_fault_is_dropped_with_its_reason(shapenet, tmp_path):
    report_path = tmp_path / "cleaning.csv"
    kept = Clean(CleanConfig(test_size=0.25, train_size=None)).run(shapenet.root, str(report_path))
    report = _report(report_path)
    for fault in shapenet.faults:
        row = report[(fault.synset_id, fault.model_id)]
        assert (row["status"], row["reason"]) == ("dropped", fault.reason)
    good = {(s, m) for s, ids in shapenet.good.items() for m in ids}
    assert {(e.synset_id, e.model_id) for e in kept} == good
    # every model folder on disk has exactly one row
    assert len(report) == sum(len(ids) for ids in shapenet.models.values())


def test_hyponym_is_merged_into_its_parent_category(shapenet, tmp_path):
    kept = Clean(CleanConfig(test_size=0.25, train_size=None)).run(shapenet.root, str(tmp_path / "r.csv"))
    [(child, parent)] = shapenet.hyponyms.items()
    parent_name = read_taxonomy(shapenet.root)[parent]["name"].split(",")[0]
    child_models = [e for e in kept if e.synset_id == child]
    assert child_models and all(e.category == parent_name for e in child_models)


def test_split_is_by_model_deterministic_and_sized(shapenet, tmp_path):
    cfg = CleanConfig(test_size=0.25, train_size=None, seed=3)
    a = Clean(cfg).run(shapenet.root, str(tmp_path / "a.csv"))
    b = Clean(cfg).run(shapenet.root, str(tmp_path / "b.csv"))
    assert a == b
    assert (tmp_path / "a.csv").read_bytes() == (tmp_path / "b.csv").read_bytes()
    train = {e.model_id for e in a if e.split == "train"}
    test = {e.model_id for e in a if e.split == "test"}
    assert not train & test
    assert len(test) == round(0.25 * len(a)) and len(train) == len(a) - len(test)
    other = Clean(CleanConfig(test_size=0.25, train_size=None, seed=4)).run(shapenet.root, str(tmp_path / "c.csv"))
    assert {e.model_id for e in other if e.split == "test"} != test


def test_counts_larger_than_the_data_scale_down(shapenet, tmp_path):
    kept = Clean(CleanConfig()).run(shapenet.root, str(tmp_path / "r.csv"))  # paper: 11,347 / 1,000
    n_test = sum(e.split == "test" for e in kept)
    assert n_test == round(1000 * len(kept) / 12347)
    assert all(e.split in ("train", "test") for e in kept)


def test_dropped_category_and_category_selection(shapenet, tmp_path):
    config = tmp_path / "categories.yaml"
    config.write_text('merges: {"02992529": "04401088"}\ndropped: {"02958343": "poor generation quality"}\n')
    report_path = tmp_path / "r.csv"
    kept = Clean(CleanConfig(category_config=str(config), test_size=0.25, train_size=None)).run(
        shapenet.root, str(report_path)
    )
    assert not [e for e in kept if e.synset_id == "02958343"]
    cars = [r for k, r in _report(report_path).items() if k[0] == "02958343"]
    assert cars and all(r["reason"] == "category_dropped" for r in cars)
    only_mugs = Clean(CleanConfig(categories=["mug"], test_size=0.25, train_size=None)).run(
        shapenet.root, str(tmp_path / "m.csv")
    )
    assert only_mugs and {e.category for e in only_mugs} == {"mug"}


def test_bad_input_raises_input_error(tmp_path, shapenet):
    with pytest.raises(InputError, match="not found"):
        read_taxonomy(str(tmp_path / "nope"))
    with pytest.raises(InputError, match="taxonomy.json"):
        read_taxonomy(str(tmp_path))
    with pytest.raises(InputError, match="unknown categories"):
        Clean(CleanConfig(categories=["spaceship"])).run(shapenet.root, str(tmp_path / "r.csv"))
    with pytest.raises(ValueError, match="fraction"):
        CleanConfig(test_size=1.5)


def test_a_taxonomy_entry_without_a_name_is_reported(tmp_path):
    (tmp_path / "taxonomy.json").write_text('[{"synsetId": "02958343", "numInstances": 1}]')
    with pytest.raises(InputError, match="synsetId, name"):
        read_taxonomy(str(tmp_path))


def _subset(shapenet, tmp_path: Path, keep, entries=None) -> Path:
    """A copy of the fixture's folders whose taxonomy lists only the synsets ``keep`` accepts."""
    import json
    import shutil

    root = tmp_path / "subset"
    shutil.copytree(shapenet.root, root)
    taxonomy = json.loads((root / "taxonomy.json").read_text())
    (root / "taxonomy.json").write_text(json.dumps(entries if entries is not None else
                                                   [e for e in taxonomy if keep(e["synsetId"])]))
    return root


def test_a_subset_of_shapenet_builds_and_unlisted_folders_are_reported(shapenet, tmp_path):
    root = _subset(shapenet, tmp_path, lambda s: s != "04401088")  # no telephone: cellphone is not merged
    report_path = tmp_path / "r.csv"
    kept = Clean(CleanConfig(test_size=0.25, train_size=None)).run(str(root), str(report_path))
    cellphones = {e.category for e in kept if e.synset_id == "02992529"}
    assert cellphones == {"cellular telephone"}
    report = _report(report_path)
    phones = [r for (s, _), r in report.items() if s == "04401088"]
    assert phones and all(r["reason"] == "synset_not_in_taxonomy" for r in phones)
    assert len(report) == sum(len(ids) for ids in shapenet.models.values())  # still one row per model folder


def test_duplicate_or_no_synsets_in_the_taxonomy_are_refused(shapenet, tmp_path):
    import json

    taxonomy = json.loads(Path(shapenet.root, "taxonomy.json").read_text())
    relabel = [*taxonomy, {"synsetId": "02691156", "name": "zeppelin"}]
    with pytest.raises(InputError, match="lists synset 02691156 twice"):
        read_taxonomy(str(_subset(shapenet, tmp_path / "a", None, relabel)))
    assert read_taxonomy(str(_subset(shapenet, tmp_path / "b", None, [*taxonomy, taxonomy[0]])))  # same name: fine
    with pytest.raises(InputError, match="lists no synsets"):
        read_taxonomy(str(_subset(shapenet, tmp_path / "c", None, [])))


def _write_obj(root: Path, model: str, vertices, faces) -> None:
    import trimesh

    folder = root / "chairs" / model / "models"
    folder.mkdir(parents=True)
    obj = trimesh.Trimesh(vertices, faces, process=False).export(file_type="obj")
    (folder / "model_normalized.obj").write_text(obj)


def test_a_shape_kept_in_other_formats_vertex_orders_or_units_is_one_shape(shapenet, tmp_path):
    """Converted copies of one model (STL, PLY, OFF round trips, vertex order, millimetres) are dropped as
    duplicate_geometry whatever their bytes; its mirror image and other shapes stay; unit cubes of two
    packages are one shape; a lone triangle is too few faces, not stray geometry."""
    import io

    import numpy as np
    import trimesh

    from pointvl.dataset.mesh import load_mesh

    root = tmp_path / "shapenet"
    chair = "03001627"
    source = load_mesh(str(Path(shapenet.root) / chair / shapenet.good[chair][0] / "models" / "model_normalized.obj"))
    v, f = np.asarray(source.vertices), np.asarray(source.faces)
    _write_obj(root, "a-original", v, f)
    for fmt in ("stl", "ply", "off"):
        data = trimesh.Trimesh(v, f, process=False).export(file_type=fmt)
        again = trimesh.load(io.BytesIO(data if isinstance(data, bytes) else data.encode()), file_type=fmt,
                             force="mesh", process=False)
        _write_obj(root, f"b-{fmt}", np.asarray(again.vertices, dtype=np.float32), again.faces)
    order = np.random.default_rng(0).permutation(len(v))
    _write_obj(root, "c-shuffled", v[order], np.argsort(order)[f][:, ::-1])  # another vertex order and winding
    _write_obj(root, "d-millimetres", v * 1000 + 5, f)
    _write_obj(root, "e-mirror", v * [1, 1, -1], f)  # front to back (left-right it is symmetric)
    box = trimesh.creation.box()
    _write_obj(root, "f-cube", box.vertices, box.faces)
    quads = ("v -1 -1 -1\nv 1 -1 -1\nv 1 1 -1\nv -1 1 -1\nv -1 -1 1\nv 1 -1 1\nv 1 1 1\nv -1 1 1\n"
             "f 1 4 3 2\nf 5 6 7 8\nf 1 2 6 5\nf 2 3 7 6\nf 3 4 8 7\nf 4 1 5 8\n")
    (root / "chairs" / "g-cube-quads" / "models").mkdir(parents=True)
    (root / "chairs" / "g-cube-quads" / "models" / "model_normalized.obj").write_text(quads)
    _write_obj(root, "h-triangle", np.eye(3), [[0, 1, 2]])
    (root / "taxonomy.json").write_text('[{"synsetId": "chairs", "name": "chair"}]')

    report_path = tmp_path / "cleaning.csv"
    kept = Clean(CleanConfig(test_size=0.5, train_size=None)).run(str(root), str(report_path))
    report = {m: (r["status"], r["reason"], r["note"]) for (_, m), r in _report(report_path).items()}
    assert {e.model_id for e in kept} == {"a-original", "e-mirror", "f-cube"}
    for copy in ("b-stl", "b-ply", "b-off", "c-shuffled", "d-millimetres"):
        assert report[copy] == ("dropped", "duplicate_geometry", "as chairs/a-original"), copy
    assert report["g-cube-quads"] == ("dropped", "duplicate_geometry", "as chairs/f-cube")
    assert report["h-triangle"][:2] == ("dropped", "too_few_faces")
