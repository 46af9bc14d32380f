"""refine's alignment gate: the scores, the rates on the fixture's renders, and the stage's flag/drop policy."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
from gpu_inputs import disk, write_render_shard

from benchmarks.bench_alignment import fixture_renders, rates, shift, zoom
from pointvl.core import images
from pointvl.dataset.stages.alignment import alignment, foreground
from pointvl.dataset.stages.base import read_stage_table, read_stats, write_stage_table
from pointvl.dataset.stages.refine import Refine, RefineConfig


def test_scores_of_a_shift_a_zoom_and_an_aligned_image():
    rgb, mask, _ = disk(160, 128, 1)
    iou, moved, scale = alignment(rgb, mask)
    assert iou > 0.99 and moved < 0.1 and scale == 1.0
    _, moved, _ = alignment(shift(rgb, 3.0, -4.0), mask)
    assert moved == pytest.approx(5.0, abs=0.5)
    _, _, scale = alignment(zoom(rgb, 1.1), mask)
    assert scale == pytest.approx(1.1, abs=0.03)
    assert alignment(np.full_like(rgb, 230), mask)[1:] == (float("inf"), float("inf"))  # nothing left: flagged


def test_a_highlight_is_filled_and_a_real_opening_kept():
    rgb, mask, _ = disk(160, 128, 1)
    rgb[60:63, 60:63] = 230  # a 3x3 highlight in the background colour
    yy, xx = np.mgrid[0:128, 0:160]
    ring = mask & (((yy - 64) ** 2 + (xx - 80) ** 2) > 15**2)
    assert foreground(rgb, mask)[61, 61]
    ring_rgb = np.where(ring[..., None], rgb, np.uint8(230))
    assert not foreground(ring_rgb, ring)[64, 80]  # the ring's opening stays background


def test_rates_on_the_fixture_renders(shapenet):
    """>= 95 % of 2-8 px shifts and 1.1x zooms caught, < 5 % of aligned edits flagged (README: 512², all edits)."""
    renders = fixture_renders(side=256, views=1, manifest=shapenet)
    result = rates(renders, edits=("none", "all"))  # all: recolour, texture, background tint, smoothing, noise
    for name, r in result.items():
        assert r["caught_shift"] >= 0.95 and r["caught_zoom"] >= 0.95, (name, r)
        assert r["false_flag"] < 0.05, (name, r)


@pytest.mark.parametrize("policy", ["flag", "drop"])
def test_refine_flags_or_drops_a_misaligned_item(tmp_path, policy):
    run = str(tmp_path)
    ids = write_render_shard(run, 0, n=3, width=80, height=64)
    table = read_stage_table(run, "render", 0)
    renders = table.column("render").to_pylist()
    renders[1] = images.encode_rgb(shift(images.decode_rgb(renders[1]), 4.0, 0.0))  # its mask stays put
    table = table.set_column(table.schema.get_field_index("render"), "render", pa.array(renders, pa.binary()))
    write_stage_table(run, "render", 0, table, {"instances": 3})
    stats = Refine(RefineConfig(backend="passthrough", align_policy=policy)).run_shard(run, 0)
    refined = read_stage_table(run, "refine", 0)
    assert stats["align_flagged"] == 1 and read_stats(run, "refine", 0)["align_flagged"] == 1
    if policy == "flag":
        assert refined.column("align_flagged").to_pylist() == [False, True, False]
        assert refined.column("align_shift_px")[1].as_py() == pytest.approx(4.0, abs=0.5)
    else:
        assert refined.column("instance_id").to_pylist() == [ids[0], ids[2]]
        assert stats["dropped_misaligned"] == 1 and ids[1] in stats["drops"]


def test_config_checks_the_gate():
    with pytest.raises(ValueError, match="align_policy must be one of"):
        RefineConfig(align_policy="ignore")
    with pytest.raises(ValueError, match="align_scale_max >= 1"):
        RefineConfig(align_scale_max=0.9)


def test_the_summary_and_card_line():
    from pointvl.dataset.summary import alignment_line

    assert alignment_line({"refine_misaligned": 0, "dropped": {}}).endswith("alignment gate): 0")
    assert alignment_line({"refine_misaligned": 3, "dropped": {}}).endswith(": 3, flagged for review")
    assert alignment_line({"refine_misaligned": 2, "dropped": {"refine:misaligned": 2}}).endswith(": 2, 2 dropped")
