import csv
from pathlib import Path

import pytest

from pointvl.core.errors import InputError
from pointvl.dataset.stages.clean import Clean, CleanConfig, read_taxonomy


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
