"""Configs that evolve: a release adding a config field with a default keeps every run folder valid.

The plan fingerprint and the stage keys hash only output-deciding values that differ from their
defaults (:mod:`pointvl.core.strict_config`), so a new field at its default changes neither: an existing
run folder resumes, plainly or incrementally, with nothing recomputed. The price is that an existing
default never changes in place; ``data/output_defaults.json`` holds them to that.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest

import pointvl
from pointvl.core.strict_config import OPERATIONAL, ConfigError
from pointvl.dataset.config import BuildConfig
from pointvl.dataset.incremental import stage_keys
from pointvl.dataset.plan import ModelEntry, Shard, fingerprint, load_plan
from pointvl.dataset.runner import build_in_process
from pointvl.dataset.stages.render import RenderConfig

CONFIG = {"shard_size": 8, "clean": {"test_size": 3, "train_size": None},
          "sample_points": {"num_points": 256}, "render": {"width": 48, "height": 48}}
DEFAULTS = Path(__file__).parent / "data" / "output_defaults.json"


def later_release() -> type[BuildConfig]:
    """BuildConfig as a later release might have it: a new render field, a new section, a new operational field."""
    render = dataclasses.make_dataclass(
        "RenderConfig", [("specular", "float", dataclasses.field(default=0.0))], bases=(RenderConfig,))
    denoise = dataclasses.make_dataclass("DenoiseConfig", [("strength", "float", dataclasses.field(default=0.0))])
    return dataclasses.make_dataclass("BuildConfig", [
        ("render", render, dataclasses.field(default_factory=render)),
        ("denoise", denoise, dataclasses.field(default_factory=denoise)),
        ("log_every", "int", dataclasses.field(default=10, metadata=OPERATIONAL)),
    ], bases=(BuildConfig,))


def _mtimes(run: Path) -> dict[str, int]:
    return {str(p.relative_to(run)): p.stat().st_mtime_ns for p in run.glob("**/*") if p.is_file()}


def test_an_added_field_keeps_a_run_folder_resumable_with_nothing_recomputed(shapenet, tmp_path):
    source, run = tmp_path / "shapenet", tmp_path / "run"
    shutil.copytree(shapenet.root, source)
    build_in_process(str(source), str(run), BuildConfig.from_dict(CONFIG), incremental=True)
    plan = load_plan(str(run))
    before = _mtimes(run)

    evolved = later_release().from_dict(CONFIG)
    assert evolved.render.specular == 0.0 and evolved.denoise.strength == 0.0
    assert fingerprint(str(source), evolved.output_dict()) == plan.fingerprint
    # workers=0: the later release's config classes exist in this process only (a worker cannot import them)
    build_in_process(str(source), str(run), evolved, workers=0)  # a plain resume: the plan is accepted
    build_in_process(str(source), str(run), evolved, incremental=True, workers=0)  # every stage key still matches

    changed = sorted(p for p, t in _mtimes(run).items() if before.get(p) != t)
    # cleaning runs again in the incremental build (it must, to see new models); no plan, key, stage or shard
    assert changed == ["config.json", "reports/cleaning.csv", "shards/README.md"], changed
    assert not (run / "superseded").exists()
    assert load_plan(str(run)) == plan


def test_a_new_field_set_off_its_default_changes_exactly_what_it_decides():
    release = later_release()
    categories = ["chair", "mug"]
    shard = Shard(0, "train", 0, 1, (ModelEntry("03001627", "m0", "chair", "train", "m0.obj", "ab12"),), 1)
    base = stage_keys(shard, release.from_dict(CONFIG), categories)
    assert base == stage_keys(shard, BuildConfig.from_dict(CONFIG), categories)
    moved = stage_keys(shard, release.from_dict({**CONFIG, "render": {**CONFIG["render"], "specular": 0.3}}),
                       categories)
    assert {s for s in base if base[s] != moved[s]} == {"render", "kpts2d", "refine", "synthesize", "annotate",
                                                         "review", "write_shards"}
    assert release.from_dict({**CONFIG, "denoise": {"strength": 0.5}}).output_dict()["denoise"] == {"strength": 0.5}
    assert release.from_dict({**CONFIG, "log_every": 1}).output_dict() == BuildConfig.from_dict(CONFIG).output_dict()
    with pytest.raises(ConfigError, match="render.specular must be float"):
        release.from_dict({"render": {"specular": "shiny"}})


def test_operational_fields_are_marked_on_the_field():
    cfg = BuildConfig.from_dict({"gpu_workers": 4, "annotate": {"concurrency": 16, "redo_failed": True},
                                 "review": {"timeout_s": 60}, "handoff": {"train": False}})
    assert cfg.output_dict() == {}
    marked = {f.name for f in dataclasses.fields(cfg.annotate) if f.metadata.get("operational")}
    assert {"redo_failed", "concurrency", "requests_per_minute", "llm_api_key_env"} <= marked
    qa = {"annotate": {"n_attribute_qa": 5}}
    assert BuildConfig.from_dict(qa).output_dict() == qa


def test_stating_a_default_explicitly_is_the_default():
    assert BuildConfig.from_dict({"render": {"elevation_deg": [15, 35], "width": 512}}).output_dict() == {}


def output_defaults() -> dict:
    """The default of every output-deciding field, paths inside the package written as ``<pointvl>/...``."""
    def section(obj) -> dict:
        out = {}
        for f in dataclasses.fields(obj):
            if f.metadata.get("operational"):
                continue
            value = getattr(obj, f.name)
            out[f.name] = section(value) if dataclasses.is_dataclass(value) else value
        return out
    root = str(Path(pointvl.__file__).parent)
    text = json.dumps(section(BuildConfig()), sort_keys=True).replace(root, "<pointvl>")
    return json.loads(text)


def test_no_default_changed_in_place():
    """A default changed in place would change outputs under an unchanged fingerprint: add a field, or a new
    value of a version field, instead. New fields need no entry in the file (it may lag behind)."""
    recorded, current = json.loads(DEFAULTS.read_text()), output_defaults()

    def changed(old: dict, new: dict, where: str = "") -> list[str]:
        out = []
        for key, value in old.items():
            if key not in new:
                out.append(f"{where}{key} removed")
            elif isinstance(value, dict) and isinstance(new[key], dict):
                out += changed(value, new[key], f"{where}{key}.")
            elif value != new[key]:
                out.append(f"{where}{key}: {value!r} -> {new[key]!r}")
        return out

    assert changed(recorded, current) == []
