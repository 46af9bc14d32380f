"""The review stage's library side: decisions, policies, the log, contact sheets (no Prefect)."""

from __future__ import annotations

from io import BytesIO

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pointvl.dataset.build_config import BuildConfig
from pointvl.dataset.dag import make_stage
from pointvl.dataset.runner import build_in_process
from pointvl.dataset.stages.review import (
    HELD_REASON,
    MASK_BOX,
    ReviewConfig,
    apply_decisions,
    contact_sheet,
    decide_held,
    form_decisions,
    held_items,
    items,
    policy_decisions,
    read_log,
)
from pointvl.dataset.tables import read_stage_table, write_stage_table

CONFIG = {"shard_size": 16, "clean": {"test_size": 0.25, "train_size": None},
          "sample_points": {"num_points": 256}, "render": {"width": 64, "height": 64}}


@pytest.fixture(scope="module")
def run(shapenet, tmp_path_factory) -> str:
    """A finished local build whose synthesize shard 0 has its first item flagged for pose drift."""
    out = str(tmp_path_factory.mktemp("review") / "run")
    build_in_process(shapenet.root, out, BuildConfig.from_dict(CONFIG))
    flag_first_item(out)
    return out


def flag_first_item(run: str) -> None:
    """Flag synthesize shard 0's first item for pose drift. Annotate was made from the table replaced,
    so it is recomputed from the new one (a stale input is refused when read)."""
    table = read_stage_table(run, "synthesize", 0)
    flags = [True] + [False] * (table.num_rows - 1)
    flagged = table.set_column(table.schema.get_field_index("drift_flagged"), "drift_flagged", pa.array(flags))
    write_stage_table(run, "synthesize", 0, flagged, {"drift_flagged": 1})
    make_stage("annotate", BuildConfig.from_dict(CONFIG)).run_shard(run, 0)


def test_policies_hold_only_flagged_items(run):
    first = items(run, 0)[0]
    assert first.flagged and not any(it.flagged for it in items(run, 0)[1:])
    held = policy_decisions(run, [0], "accept_unflagged", "timeout")[0]
    assert [(d["decision"], d["reason"]) for d in held if d["instance_id"] == first.instance_id] == [
        ("held", HELD_REASON)]
    assert all(d["decision"] == "approved" for d in held if d["instance_id"] != first.instance_id)
    assert {d["decision"] for d in policy_decisions(run, [0], "accept_all", "timeout")[0]} == {"approved"}


def test_form_answers_are_checked(run):
    iid = items(run, 1)[0].instance_id
    with pytest.raises(ValueError, match="not in the shards"):
        form_decisions(run, [0], False, {iid: "bad"}, "bo", "cli")  # an id of another shard
    with pytest.raises(ValueError, match="not both"):
        form_decisions(run, [1], True, {iid: "bad"}, "bo", "cli")
    with pytest.raises(ValueError, match="reviewer"):
        form_decisions(run, [1], True, {}, " ", "cli")


def test_decisions_are_logged_and_cover_the_shard(run):
    iid = items(run, 1)[0].instance_id
    before = len(read_log(run))
    decisions = form_decisions(run, [1], False, {iid: "blurry"}, "bo", "cli")[1]
    with pytest.raises(ValueError, match="cover exactly"):
        apply_decisions(run, 1, decisions[1:])
    stats = apply_decisions(run, 1, decisions)
    assert stats["rejected"] == 1 and stats["approved"] == len(decisions) - 1
    log = read_log(run)[before:]
    assert len(log) == len(decisions)
    assert {(e["instance_id"], e["reason"]) for e in log if e["decision"] == "rejected"} == {(iid, "blurry")}
    assert read_stage_table(run, "review", 1).column("decision").to_pylist().count("rejected") == 1


def test_contact_sheet_draws_every_item_with_its_mask_box(run):
    cfg = ReviewConfig(thumb_px=64, sheet_columns=2)
    sheet = Image.open(BytesIO(contact_sheet(run, 0, cfg))).convert("RGB")
    n = len(items(run, 0))
    assert sheet.width > 2 * 3 * 64 and sheet.height > (n // 2) * 64
    green = sum(1 for p in sheet.getdata() if p == MASK_BOX)
    assert green > n * 4 * 20  # a box outline per item


@pytest.mark.parametrize("kwargs", [{"gate": "sometimes"}, {"timeout_policy": "maybe"}, {"timeout_s": 0},
                                    {"preview_port": 70000}, {"thumb_px": 8}])
def test_config_refuses_bad_values(kwargs):
    with pytest.raises(ValueError):
        ReviewConfig(**kwargs)


def test_held_items_stay_out_of_the_shards_until_a_person_approves_them(shapenet, tmp_path):
    out = str(tmp_path / "run")
    cfg = BuildConfig.from_dict(CONFIG)
    build_in_process(shapenet.root, out, cfg)  # the gate is off: the policy applies at once
    flag_first_item(out)
    first = items(out, 0)[0].instance_id
    apply_decisions(out, 0, policy_decisions(out, [0], "accept_unflagged", "timeout")[0])
    build_in_process(shapenet.root, out, cfg)
    final = next((tmp_path / "run" / "shards").glob("train-00000-*.parquet"))
    assert first not in pq.read_table(final).column("instance_id").to_pylist()
    assert held_items(out, [0, 1]) == {0: [first]}

    with pytest.raises(ValueError, match="not held"):
        decide_held(out, [0, 1], False, {"nope": "x"}, "ana")
    assert decide_held(out, [0, 1], True, {}, "ana") == {"approved": 1, "rejected": 0}
    build_in_process(shapenet.root, out, cfg)  # what `pointvl resume` does
    assert first in pq.read_table(final).column("instance_id").to_pylist()
    assert held_items(out, [0, 1]) == {}
    assert read_log(out)[-1] | {"decided_at": ""} == read_log(out)[-1] | {
        "instance_id": first, "decision": "approved", "reviewer": "ana", "decided_at": ""}


def test_pages_split_a_shard_flagged_first_and_answers_are_kept_per_page(run):
    from pointvl.dataset.stages.review import (
        page_answers,
        page_sheet,
        paged_decisions,
        policy_rest,
        save_page_answer,
        shard_pages,
    )

    pages = shard_pages(run, 0, 5)
    ids = [it.instance_id for page in pages for it in page]
    assert [len(p) for p in pages] == [5] * (len(ids) // 5) + ([len(ids) % 5] if len(ids) % 5 else [])
    assert pages[0][0].flagged and sorted(ids) == sorted(it.instance_id for it in items(run, 0))
    sheet = Image.open(BytesIO(page_sheet(run, 0, 1, ReviewConfig(page_size=5))))
    assert sheet.width == 3 * 160 + 2 * 6 + 12  # one column: the resume form shows it at >= 0.75 scale
    assert paged_decisions(run, 0, 5, None) is None  # nothing answered yet

    first = [it.instance_id for it in pages[0]]
    with pytest.raises(ValueError, match="not on this page"):
        save_page_answer(run, 0, 0, first, {ids[-1]: "x"}, "ana", "2026-01-01T00:00:00+00:00", "cli")
    save_page_answer(run, 0, 0, first, {first[1]: "blurry"}, "ana", "2026-01-01T00:00:00+00:00", "prefect form")
    assert list(page_answers(run, 0, pages)) == [0]
    assert page_answers(run, 0, shard_pages(run, 0, 4)) == {}  # an answer for other items does not count
    rows = {r["instance_id"]: r for r in paged_decisions(run, 0, 5, policy_rest("accept_unflagged", "timeout"))}
    assert (rows[first[1]]["decision"], rows[first[1]]["decided_at"]) == ("rejected", "2026-01-01T00:00:00+00:00")
    assert rows[first[0]]["decision"] == "approved" and rows[first[0]]["reviewer"] == "ana"  # flagged, answered
    assert {r["reviewer"] for i, r in rows.items() if i not in first} == {"policy:accept_unflagged"}
    for j, page in enumerate(pages[1:], 1):
        save_page_answer(run, 0, j, [it.instance_id for it in page], {}, "bo", "2026-01-02T00:00:00+00:00", "cli")
    done = paged_decisions(run, 0, 5, None)
    assert len(done) == len(ids) and [r["instance_id"] for r in done if r["decision"] == "rejected"] == [first[1]]
    with pytest.raises(ValueError, match="page_size"):
        ReviewConfig(page_size=0)
