"""The build summary and the dataset card: a build whose GPU stages passed through says so first."""

from __future__ import annotations

import pytest

from pointvl.dataset.build_config import BuildConfig
from pointvl.dataset.run_folder import RunFolder
from pointvl.dataset.runner import build_in_process
from pointvl.dataset.summary import dataset_card, format_summary, passthrough_line

CONFIG = {"shard_size": 8, "clean": {"test_size": 3, "train_size": None}, "sample_points": {"num_points": 256},
          "render": {"width": 32, "height": 32}, "refine": {"backend": "passthrough"},
          "synthesize": {"backend": "passthrough"}}


def _body(card: str) -> list[str]:
    """The card's lines after its YAML front matter."""
    lines = card.splitlines()
    end = lines.index("---", 1)
    return lines[end + 1:]


def test_a_passthrough_build_says_first_that_its_images_are_unrefined_renders(shapenet, tmp_path):
    run = str(tmp_path / "run")
    summary = build_in_process(shapenet.root, run, BuildConfig.from_dict(CONFIG))
    n = summary["records"]
    assert n > 0 and summary["passthrough"] == {"refine": n, "synthesize": n}
    first = format_summary(summary).splitlines()[0]
    assert first.startswith("WARNING: UNREFINED RENDERS: the images of these records are unrefined renders")
    assert f"refine ×{n}, synthesize ×{n} of {n} records passed through" in first
    with open(RunFolder.of(run).dataset_card) as f:
        card = f.read()
    assert card == dataset_card(summary)
    assert _body(card)[0].startswith("> **Warning: UNREFINED RENDERS: the images of these records are unrefined")


@pytest.mark.parametrize(("passed", "head"), [
    ({}, None),
    ({"synthesize": 4}, "NOT PHOTOREAL: the `image` of these records is the refined render"),
    ({"refine": 2}, "UNREFINED RENDERS"),
])
def test_the_warning_names_what_passed_through(passed, head):
    summary = {"run_dir": "RUN", "shards_dir": "RUN/shards", "shard_files": ["a"], "shards_planned": 1, "records": 4,
               "per_split": {"train": 4}, "per_split_category": {"train/chair": 4}, "dropped": {}, "flagged": 0,
               "annotate_failed": {"items": 0, "retry": "pointvl build ..."},
               "review": {"approved": 0, "rejected": 0, "held": 0}, "backends": {}, "passthrough": passed,
               "refine_misaligned": 0}
    text, body = format_summary(summary).splitlines(), _body(dataset_card(summary))
    if head is None:
        assert passthrough_line(summary) is None
        assert text[0].startswith("records: 4") and body[0].startswith("# Generative-Refined")
    else:
        assert text[0].startswith(f"WARNING: {head}") and body[0].startswith(f"> **Warning: {head}")
        assert body[2].startswith("# Generative-Refined")
