import json
import os
import re
from pathlib import Path

import numpy as np
import open3d as o3d
import pytest
import trimesh

from pointvl.cli import main
from pointvl.core.errors import InputError
from pointvl.fixture import CATEGORIES, FixtureManifest, write_fixture

AIRPLANE, BOTTLE, CAR, CELLPHONE, CHAIR = "02691156", "02876657", "02958343", "02992529", "03001627"
LAMP, MUG, TABLE, TELEPHONE = "03636649", "03797390", "04379243", "04401088"


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, FixtureManifest]:
    root = tmp_path_factory.mktemp("shapenet")
    return root, write_fixture(str(root), seed=0)


def obj_path(root: Path, synset: str, model: str) -> Path:
    return root / synset / model / "models" / "model_normalized.obj"


def good_models(manifest: FixtureManifest) -> list[tuple[str, str]]:
    return [(s, m) for s, ids in manifest.good.items() for m in ids]


def parts(path: Path) -> dict[str, np.ndarray]:
    """Vertices of each material group (trimesh splits an OBJ by ``usemtl``)."""
    scene = trimesh.load(path, process=False)
    return {name: np.asarray(g.vertices) for name, g in scene.geometry.items()}


def files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_layout_and_taxonomy(tree: tuple[Path, FixtureManifest]) -> None:
    root, manifest = tree
    taxonomy = json.loads((root / "taxonomy.json").read_text())
    by_id = {t["synsetId"]: t for t in taxonomy}
    assert set(by_id) == set(CATEGORIES) == {AIRPLANE, BOTTLE, CAR, CELLPHONE, CHAIR, LAMP, MUG, TABLE, TELEPHONE}
    assert by_id[CAR]["name"] == "car,auto,automobile,machine,motorcar"
    assert by_id[TELEPHONE]["children"] == [CELLPHONE]
    assert all(t["children"] == [] for s, t in by_id.items() if s != TELEPHONE)
    for synset in CATEGORIES:
        folders = sorted(p.name for p in (root / synset).iterdir())
        assert folders == list(manifest.models[synset])
        assert by_id[synset]["numInstances"] == len(folders)
        assert len(manifest.good[synset]) >= 4
        assert all(re.fullmatch(r"[0-9a-f]{32}", m) for m in folders)
    for synset, model in good_models(manifest):
        names = sorted(os.listdir(root / synset / model / "models"))
        assert names == ["model_normalized.json", "model_normalized.mtl", "model_normalized.obj"]


def test_good_meshes_load_in_shapenet_frame(tree: tuple[Path, FixtureManifest]) -> None:
    root, manifest = tree
    for synset, model in good_models(manifest):
        path = obj_path(root, synset, model)
        mesh = trimesh.load(path, force="mesh", process=False)
        assert 40 <= len(mesh.faces) <= 3000, (synset, len(mesh.faces))
        lo, hi = mesh.bounds
        assert np.linalg.norm(hi - lo) == pytest.approx(1.0, abs=1e-4)
        np.testing.assert_allclose((lo + hi) / 2, 0.0, atol=1e-5)
        assert len(o3d.io.read_triangle_mesh(str(path)).triangles) == len(mesh.faces)
        # the json, as in real ShapeNet, counts the vertices but gives bounds in another frame
        info = json.loads(path.with_suffix(".json").read_text())
        assert info["id"] == model and info["numVertices"] == len(mesh.vertices)
        assert not np.allclose(info["min"], lo, atol=1e-3)


def test_category_shapes(tree: tuple[Path, FixtureManifest]) -> None:
    root, manifest = tree

    def each(synset: str) -> list[dict[str, np.ndarray]]:
        return [parts(obj_path(root, synset, m)) for m in manifest.good[synset]]

    def extent(v: np.ndarray) -> np.ndarray:
        return v.max(0) - v.min(0)

    for p in each(CAR):
        x, y, z = extent(np.concatenate(list(p.values())))
        assert z > 1.5 * y and z > x  # long along Z
        assert p["headlight"][:, 2].max() < p["body"][:, 2].min() + 0.02  # lights at the front, -Z
    for p in each(MUG):
        x, _, z = extent(np.concatenate(list(p.values())))
        assert x > 1.3 * z  # the handle sticks out along +X only
        body_center_x = (p["body"][:, 0].max() + p["body"][:, 0].min()) / 2
        assert p["handle"][:, 0].min() > body_center_x
    for p in each(CHAIR):
        assert p["back"][:, 2].mean() > p["seat"][:, 2].mean()  # back behind the seat: it faces -Z
        assert p["back"][:, 1].max() > p["seat"][:, 1].max()
    for p in each(AIRPLANE):
        assert extent(p["wing"])[0] > 3 * extent(p["fuselage"])[0]
        assert p["fuselage"][:, 2].min() < p["wing"][:, 2].min()  # nose at -Z
        assert p["tail"][:, 2].mean() > 0 and p["tail"][:, 1].max() == max(v[:, 1].max() for v in p.values())
    for p in each(TABLE):
        assert p["top"][:, 1].max() > p["leg"][:, 1].max() - 1e-6
        assert p["top"][:, 1].min() > p["leg"][:, 1].mean()
    for synset, top, bottom in ((LAMP, "shade", "base"), (BOTTLE, "cap", "body")):
        for p in each(synset):
            assert p[top][:, 1].max() > p[bottom][:, 1].max() and p[bottom][:, 1].min() <= p[top][:, 1].min()
    for p in each(CELLPHONE):
        x, y, z = extent(np.concatenate(list(p.values())))
        assert y > x > 4 * z  # upright slab
        assert p["screen"][:, 2].mean() < p["body"][:, 2].mean()  # screen faces -Z
    for p in each(TELEPHONE):
        assert p["keypad"][:, 2].mean() < p["handset"][:, 2].mean()


def test_every_part_has_its_own_colour(tree: tuple[Path, FixtureManifest]) -> None:
    root, manifest = tree
    for synset, model in good_models(manifest):
        path = obj_path(root, synset, model)
        used = re.findall(r"^usemtl (\S+)$", path.read_text(), flags=re.M)
        kd = dict(re.findall(r"^newmtl (\S+)\nKa .*\nKd (.+)$", path.with_suffix(".mtl").read_text(), flags=re.M))
        assert len(used) >= 2 and set(used) == set(kd)
        colours = {tuple(float(c) for c in v.split()) for v in kd.values()}
        assert len(colours) == len(kd) and all(0 <= c <= 1 for rgb in colours for c in rgb)


def test_textured_model(tree: tuple[Path, FixtureManifest]) -> None:
    root, manifest = tree
    assert len(manifest.textured) == 1
    synset, model = manifest.textured[0].split("/")
    path = obj_path(root, synset, model)
    text = path.read_text()
    assert text.count("\nvt ") == text.count("\nv ") > 0
    assert "map_Kd ../images/texture0.png" in path.with_suffix(".mtl").read_text()
    assert (root / synset / model / "images" / "texture0.png").is_file()
    o3d_mesh = o3d.io.read_triangle_mesh(str(path), True)
    assert np.asarray(o3d_mesh.textures[0]).shape == (64, 64, 3)
    # ShapeNet's textures sit in ../images, outside the folder trimesh resolves by default
    resolver = trimesh.resolvers.FilePathResolver(str(path), allow_anywhere=True)
    body = trimesh.load(path, resolver=resolver).geometry["body"]
    assert body.visual.material.image.size == (64, 64)


def test_faults_are_planted_as_described(tree: tuple[Path, FixtureManifest]) -> None:
    root, manifest = tree
    faults = {(f.synset_id, f.model_id): f for f in manifest.faults}
    by_name: dict[str, list] = {}
    for f in manifest.faults:
        by_name.setdefault(f.reason, []).append(f)
    assert {k: len(v) for k, v in by_name.items()} == {
        "model_in_two_categories": 2,
        "missing_obj": 1,
        "no_faces": 1,
        "unreadable": 1,
        "duplicate_geometry": 1,
    }

    a, b = by_name["model_in_two_categories"]
    assert a.model_id == b.model_id and {a.synset_id, b.synset_id} == {CHAIR, TABLE}
    assert obj_path(root, a.synset_id, a.model_id).read_bytes() != obj_path(root, b.synset_id, b.model_id).read_bytes()

    (empty,) = by_name["missing_obj"]
    assert (root / empty.synset_id / empty.model_id).is_dir()
    assert os.listdir(root / empty.synset_id / empty.model_id) == []

    (bare,) = by_name["no_faces"]
    text = obj_path(root, bare.synset_id, bare.model_id).read_text()
    assert "\nv " in text and "\nf " not in text
    assert len(trimesh.load(obj_path(root, bare.synset_id, bare.model_id), force="mesh").faces) == 0

    (corrupt,) = by_name["unreadable"]
    path = obj_path(root, corrupt.synset_id, corrupt.model_id)
    with pytest.raises(ValueError):
        trimesh.load(path, force="mesh")
    assert len(o3d.io.read_triangle_mesh(str(path)).triangles) == 0

    (copy,) = by_name["duplicate_geometry"]
    original = copy.related.split("/")
    assert original[0] == copy.synset_id and original[1] < copy.model_id and tuple(original) not in faults
    for suffix in (".obj", ".mtl"):
        src = obj_path(root, *original).with_suffix(suffix).read_bytes()
        assert obj_path(root, copy.synset_id, copy.model_id).with_suffix(suffix).read_bytes() == src

    # cellphone is telephone's hyponym: both hold good models, merged rather than dropped
    assert manifest.hyponyms == {CELLPHONE: TELEPHONE}
    assert not any(s in (CELLPHONE, TELEPHONE) for s, _ in faults)


def test_deterministic_by_seed(tree: tuple[Path, FixtureManifest], tmp_path: Path) -> None:
    root, manifest = tree
    again = write_fixture(str(tmp_path / "again"), seed=0)
    assert files(tmp_path / "again") == files(root)
    assert again.models == manifest.models and again.faults == manifest.faults
    other = write_fixture(str(tmp_path / "other"), seed=1)
    assert set(other.models[CAR]).isdisjoint(manifest.models[CAR])
    assert files(tmp_path / "other")["taxonomy.json"] == files(root)["taxonomy.json"]
    first = obj_path(tmp_path / "other", CAR, other.good[CAR][0]).read_bytes()
    assert all(first != obj_path(root, CAR, m).read_bytes() for m in manifest.good[CAR])


def test_refuses_a_folder_with_files(tmp_path: Path) -> None:
    (tmp_path / "old.txt").write_text("x")
    with pytest.raises(InputError, match="not empty"):
        write_fixture(str(tmp_path))
    assert main(["fixture", str(tmp_path)]) == 2  # the CLI reports it in one line


def test_cli_fixture(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["fixture", str(tmp_path / "out"), "--seed", "2"]) == 0
    assert "9 synsets" in capsys.readouterr().out
    assert (tmp_path / "out" / "taxonomy.json").is_file()
