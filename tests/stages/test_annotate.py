"""Stage `annotate`: the offline template annotator, and the OpenAI backend against a real HTTP
server on 127.0.0.1 (tests/fake_openai.py) that injects 429s, 500s, timeouts, disconnects,
malformed JSON and schema violations."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fake_openai import FakeOpenAI, image_sha
from pydantic import SecretStr

from pointvl.core import io
from pointvl.core.chat_client import BatchPending, FatalAPIError, InvalidReply
from pointvl.core.images import encode_mask, encode_rgb
from pointvl.dataset.stages.annotate import Annotate, AnnotateConfig
from pointvl.dataset.stages.annotate_rules import smart_resize, vlm_box_to_pixels
from pointvl.dataset.stages.base import write_stage_table

KEY = "sk-test-SECRET-annotate-42"
CATEGORIES = ["airplane", "car", "chair", "lamp", "table"]
W, H = 120, 80
COLOURS = [(200, 30, 30), (40, 80, 200), (40, 150, 60), (235, 215, 40), (130, 50, 170), (120, 75, 40)]


def make_run(root: Path, n: int = 5, synthesize: bool = True) -> tuple[str, dict[str, list[float]], dict[str, str]]:
    """Input stage tables for work shard 0: one coloured box per image on a white background.
    -> (run_dir, mask box per instance, image sha per instance)."""
    rows: dict[str, list] = {
        k: []
        for k in (
            "instance_id",
            "synset_id",
            "category",
            "render",
            "mask",
            "width",
            "height",
            "bbox3d",
            "bbox2d",
            "image",
        )
    }
    boxes, shas = {}, {}
    for i in range(n):
        iid = f"0300{i}-model{i}-0"
        x1, y1, x2, y2 = 10 + 7 * i, 8 + 3 * i, 70 + 5 * i, 60 + 2 * i
        mask = np.zeros((H, W), bool)
        mask[y1:y2, x1:x2] = True
        rgb = np.full((H, W, 3), 255, np.uint8)
        rgb[mask] = COLOURS[i % len(COLOURS)]
        photo = rgb.copy()
        photo[mask] = np.clip(photo[mask].astype(int) + 10, 0, 255).astype(np.uint8)
        rows["instance_id"].append(iid)
        rows["synset_id"].append(f"0300{i}")
        rows["category"].append(CATEGORIES[i % len(CATEGORIES)])
        rows["render"].append(encode_rgb(rgb))
        rows["mask"].append(encode_mask(mask))
        rows["width"].append(W)
        rows["height"].append(H)
        rows["bbox3d"].append([-0.3, -0.2 - 0.05 * i, -0.25, 0.3, 0.2 + 0.05 * i, 0.25])
        rows["bbox2d"].append([float(x1), float(y1), float(x2), float(y2)])
        rows["image"].append(encode_rgb(photo))
        boxes[iid] = [float(x1), float(y1), float(x2), float(y2)]
        shas[iid] = image_sha(
            {
                "messages": [
                    {
                        "content": [
                            {
                                "type": "image_url",
                                "image_url": {
                                    "url": "data:image/png;base64,"
                                    + __import__("base64")
                                    .b64encode(rows["image" if synthesize else "render"][-1])
                                    .decode()
                                },
                            }
                        ]
                    }
                ]
            }
        )
    run = str(root)
    ids = pa.array(rows["instance_id"])
    f32 = pa.list_(pa.float32())
    render = pa.table(
        {
            "instance_id": ids,
            "synset_id": rows["synset_id"],
            "category": rows["category"],
            "render": pa.array(rows["render"], pa.binary()),
            "mask": pa.array(rows["mask"], pa.binary()),
            "width": rows["width"],
            "height": rows["height"],
        }
    )
    write_stage_table(run, "render", 0, render, {})
    write_stage_table(run, "geometry", 0, pa.table({"instance_id": ids, "bbox3d": pa.array(rows["bbox3d"], f32)}), {})
    write_stage_table(run, "kpts2d", 0, pa.table({"instance_id": ids, "bbox2d": pa.array(rows["bbox2d"], f32)}), {})
    if synthesize:
        write_stage_table(
            run, "synthesize", 0, pa.table({"instance_id": ids, "image": pa.array(rows["image"], pa.binary())}), {}
        )
    return run, boxes, shas


def online(srv: FakeOpenAI, **kw) -> AnnotateConfig:
    opts = dict(
        backend="openai",
        llm_base_url=srv.base_url,
        vlm_base_url=srv.base_url,
        vlm_model="Qwen/Qwen2.5-VL-7B-Instruct",
        timeout_s=0.5,
        max_retries=3,
        max_reasks=2,
        backoff_initial_s=0.01,
        backoff_max_s=0.05,
        requests_per_minute=0,
        concurrency=2,
        batch_poll_interval_s=0.01,
    )
    opts.update(kw)
    return AnnotateConfig(**opts)


def read(run: str) -> list[dict]:
    return io.read_table(io.join(run, "stages/annotate/shard-00000.parquet")).to_pylist()


COLUMNS = [
    "instance_id",
    "qa",
    "description",
    "bbox2d",
    "bbox2d_vlm",
    "vlm_agreement",
    "annotate_flagged",
    "annotate_status",
    "annotate_failure_reason",
    "annotate_provenance",
]


# ------------------------------------------------------------------------------------------------
# offline


def test_offline_default_is_deterministic_and_uses_the_mask_box(tmp_path: Path) -> None:
    a, boxes, _ = make_run(tmp_path / "a")
    b, _, _ = make_run(tmp_path / "b")
    stats = Annotate(AnnotateConfig(), CATEGORIES).run_shard(a, 0)
    Annotate(AnnotateConfig(), CATEGORIES).run_shard(b, 0)
    pa_, pb = (Path(r, "stages/annotate/shard-00000.parquet").read_bytes() for r in (a, b))
    assert pa_ == pb
    rows = read(a)
    assert pq.read_schema(Path(a, "stages/annotate/shard-00000.parquet")).names == COLUMNS
    assert stats["instances"] == stats["ok"] == 5 and stats["failed"] == 0
    assert json.loads(Path(a, "stages/annotate/shard-00000.stats.json").read_text())["ok"] == 5
    for i, r in enumerate(rows):
        qa = json.loads(r["qa"])
        cq = qa[0]
        assert cq["answer"] == CATEGORIES[i % 5] and cq["answer"] in cq["choices"]
        assert set(cq["choices"]) <= set(CATEGORIES) and len(cq["choices"]) == 4
        assert all(q["answer"] in q["choices"] for q in qa) and len(qa) >= 4
        assert r["bbox2d"] == pytest.approx(boxes[r["instance_id"]]) and r["bbox2d_vlm"] is None
        assert r["annotate_status"] == "ok" and r["annotate_flagged"] is False
        assert json.loads(r["annotate_provenance"])["backend"] == "offline"
        assert CATEGORIES[i % 5] in r["description"]
    colour_q = json.loads(rows[0]["qa"])[1]
    assert colour_q["answer"] == "red"  # item 0 is red under its mask
    taller = json.loads(rows[4]["qa"])[3]  # item 4: 0.6 wide, 0.8 tall
    assert taller["answer"] == "yes"
    again = Annotate(AnnotateConfig(), CATEGORIES).run_shard(a, 0)
    assert again["skipped"] is True


def test_missing_inputs_and_unknown_categories_fail_before_any_work(tmp_path: Path) -> None:
    run, _, _ = make_run(tmp_path)
    with pytest.raises(ValueError, match="not in the categories"):
        Annotate(AnnotateConfig(), ["chair", "table"]).run_shard(run, 0)
    with pytest.raises(FileNotFoundError, match="run the render stage"):
        Annotate(AnnotateConfig(), CATEGORIES).run_shard(run, 1)


@pytest.mark.parametrize(
    "kw, msg",
    [
        ({"backend": "anthropic"}, "backend"),
        ({"bbox2d_source": "vlm"}, "offline backend has no VLM"),
        ({"backend": "openai", "llm_temperature": 0.2}, "GPT-5 rejects"),
        ({"vlm_coordinates": "pixels"}, "vlm_coordinates"),
        ({"prompt_version": "v99"}, "no prompt file"),
        ({"n_attribute_qa": 20}, "n_attribute_qa"),
        ({"concurrency": 0}, "concurrency"),
    ],
)
def test_config_validation_says_how_to_fix(kw: dict, msg: str) -> None:
    with pytest.raises(ValueError, match=msg):
        AnnotateConfig(**kw)


# ------------------------------------------------------------------------------------------------
# coordinates


def test_coordinate_conventions_and_clamping() -> None:
    assert smart_resize(500, 1000) == (504, 1008)
    h, w = smart_resize(80, 120)
    assert h % 28 == 0 and w % 28 == 0
    # Qwen2.5-VL: pixels of the resized image
    assert vlm_box_to_pixels([0, 0, 1008, 504], "qwen2.5-vl", 1000, 500) == pytest.approx([0, 0, 1000, 500])
    assert vlm_box_to_pixels([100.8, 50.4, 504, 252], "qwen2.5-vl", 1000, 500) == pytest.approx([100, 50, 500, 250])
    # Qwen3-VL: 0-1000 relative
    assert vlm_box_to_pixels([100, 200, 500, 1000], "qwen3-vl", 640, 480) == pytest.approx([64, 96, 320, 480])
    assert vlm_box_to_pixels([-5, 10, 700, 90], "absolute", 640, 80) == pytest.approx([0, 10, 640, 80])
    with pytest.raises(InvalidReply, match="empty"):
        vlm_box_to_pixels([700, 10, 800, 20], "absolute", 640, 80)


# ------------------------------------------------------------------------------------------------
# openai backend


@pytest.mark.parametrize("convention", ["qwen2.5-vl", "qwen3-vl"])
def test_openai_backend_annotates_every_item(tmp_path: Path, convention: str) -> None:
    run, boxes, _ = make_run(tmp_path, n=4)
    with FakeOpenAI(api_key=KEY, vlm_convention=convention) as srv:
        cfg = online(srv, vlm_coordinates=convention, bbox2d_source="vlm")
        stats = Annotate(cfg, CATEGORIES, api_key=SecretStr(KEY), vlm_api_key=SecretStr(KEY)).run_shard(run, 0)
    rows = read(run)
    assert stats["ok"] == 4 and stats["api_calls"] == 8 and stats["cache_hits"] == 0
    for i, r in enumerate(rows):
        assert r["annotate_status"] == "ok" and r["annotate_failure_reason"] is None
        qa = json.loads(r["qa"])
        assert qa[0]["answer"] == CATEGORIES[i] and set(qa[0]["choices"]) <= set(CATEGORIES)
        assert len(qa) == 4 and r["description"]
        mask_box = boxes[r["instance_id"]]
        assert r["bbox2d_vlm"] == pytest.approx(mask_box, abs=2.0)  # rounding in the model's own frame
        assert r["bbox2d"] == r["bbox2d_vlm"]  # bbox2d_source="vlm"
        assert r["vlm_agreement"] > 0.9 and r["annotate_flagged"] is False
        prov = json.loads(r["annotate_provenance"])
        assert prov["backend"] == "openai" and prov["llm_model"] == "gpt-5" and prov["prompt_version"] == "v1"
        assert prov["vlm_model"] == "Qwen/Qwen2.5-VL-7B-Instruct" and prov["vlm_coordinates"] == convention
    qa_reqs = [r.body for r in srv.chat_records() if r.kind == "qa"]
    assert all("temperature" not in b for b in qa_reqs)  # never sent to GPT-5
    assert all(b["temperature"] == 0 for b in (r.body for r in srv.chat_records() if r.kind == "ground"))


def test_wrong_convention_is_flagged_for_review(tmp_path: Path) -> None:
    run, _, _ = make_run(tmp_path, n=2)
    with FakeOpenAI(api_key=KEY, vlm_convention="qwen2.5-vl") as srv:  # model writes resized pixels ...
        cfg = online(srv, vlm_coordinates="qwen3-vl", agreement_threshold=0.5)  # ... read as 0-1000
        Annotate(cfg, CATEGORIES, api_key=SecretStr(KEY), vlm_api_key=SecretStr(KEY)).run_shard(run, 0)
    rows = read(run)
    assert all(r["annotate_flagged"] and r["vlm_agreement"] < 0.5 for r in rows)
    assert all(r["annotate_status"] == "ok" for r in rows)  # flagged for review, not failed


def test_faults_lose_no_item_and_a_resume_pays_only_for_the_failed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    run, _, shas = make_run(tmp_path, n=6)
    ids = list(shas)
    doomed = shas[ids[2]]
    with FakeOpenAI(api_key=KEY, timeout_sleep_s=1.0) as srv:
        srv.inject("schema", times=99, match=lambda b: b.get("response_format") is not None and image_sha(b) == doomed)
        for kind in ("429", "500", "timeout", "disconnect", "bad_json", "schema"):
            srv.inject(kind, times=1, match=lambda b: image_sha(b) != doomed)
        stats = Annotate(online(srv), CATEGORIES, api_key=SecretStr(KEY), vlm_api_key=SecretStr(KEY)).run_shard(run, 0)
        rows = read(run)
        assert [r["instance_id"] for r in rows] == ids  # no item lost, input order kept
        failed = [r for r in rows if r["annotate_status"] == "failed"]
        assert [r["instance_id"] for r in failed] == [ids[2]]
        assert failed[0]["annotate_failure_reason"].startswith("qa: invalid reply after 3 attempts: schema violation")
        assert failed[0]["qa"] is None and failed[0]["bbox2d_vlm"] is not None  # grounding still done
        assert stats["failed"] == 1 and stats["failed_qa"] == 1 and stats["ok"] == 5
        first_paid = len(srv.paid())

        # a plain re-run skips the finished shard; redo_failed re-runs it, and only the failed call is paid
        srv.faults.clear()
        assert Annotate(online(srv), CATEGORIES, api_key=SecretStr(KEY), vlm_api_key=SecretStr(KEY)).run_shard(run, 0)[
            "skipped"
        ]
        n_before = len(srv.chat_records())
        stats2 = Annotate(
            online(srv, redo_failed=True), CATEGORIES, api_key=SecretStr(KEY), vlm_api_key=SecretStr(KEY)
        ).run_shard(run, 0)
        second = srv.chat_records()[n_before:]
    assert [(r.kind, r.image_sha) for r in second] == [("qa", doomed)]
    assert stats2["ok"] == 6 and stats2["cache_hits"] == 11 and stats2["api_calls"] == 1
    assert len(srv.paid()) == first_paid + 1
    # the key is in no log, table, stats or cache file
    assert KEY not in caplog.text
    for f in tmp_path.rglob("*"):
        if f.is_file():
            assert KEY.encode() not in f.read_bytes()


def test_grounding_failures_fail_the_item_and_malformed_replies_are_reasked(tmp_path: Path) -> None:
    run, boxes, shas = make_run(tmp_path, n=4)
    ids = list(shas)
    with FakeOpenAI(api_key=KEY) as srv:
        # the VLM never gives a box for item 0 (bbox2d_source: mask, the default): failed, not flagged
        srv.inject("bad_json", times=99, match=lambda b: "response_format" not in b and image_sha(b) == shas[ids[0]])
        # HTTP 200 bodies that are not chat completions: re-asked, then the item goes on
        srv.inject("text_plain", times=1, match=lambda b: image_sha(b) == shas[ids[1]])
        srv.inject("null_message", times=1, match=lambda b: image_sha(b) == shas[ids[2]])
        stats = Annotate(online(srv), CATEGORIES, api_key=SecretStr(KEY), vlm_api_key=SecretStr(KEY)).run_shard(run, 0)
    rows = {r["instance_id"]: r for r in read(run)}
    assert stats["failed"] == stats["failed_vlm"] == 1 and stats["ok"] == 3 and stats["reasks"] >= 4
    first = rows[ids[0]]
    assert first["annotate_status"] == "failed" and not first["annotate_flagged"]
    assert first["annotate_failure_reason"].startswith("vlm_failed: invalid reply after 3 attempts")
    assert all(rows[i]["bbox2d_vlm"] is not None and rows[i]["annotate_failure_reason"] is None for i in ids[1:])


def test_a_crash_mid_shard_resumes_without_paying_twice(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    monkeypatch.setenv("VLM_API_KEY", KEY)
    run, _, shas = make_run(tmp_path, n=5)
    ids = list(shas)
    with FakeOpenAI(api_key=KEY) as srv:
        srv.inject("401", times=1, match=lambda b: b.get("response_format") is None and image_sha(b) == shas[ids[3]])
        with pytest.raises(FatalAPIError):
            Annotate(online(srv, concurrency=1), CATEGORIES).run_shard(run, 0)
        assert not Path(run, "stages/annotate/shard-00000.parquet").exists()
        n_before = len(srv.chat_records())
        stats = Annotate(online(srv, concurrency=1), CATEGORIES).run_shard(run, 0)
        second = srv.chat_records()[n_before:]
    assert stats["ok"] == 5
    paid_again = {r.image_sha for r in second}
    assert not paid_again & {shas[i] for i in ids[:3]}  # items finished before the crash cost nothing
    assert shas[ids[3]] in paid_again


def test_missing_key_is_reported_before_any_request(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    run, _, _ = make_run(tmp_path, n=1)
    with FakeOpenAI(api_key=KEY) as srv:
        with pytest.raises(ValueError, match=r"\$OPENAI_API_KEY"):
            Annotate(online(srv), CATEGORIES).run_shard(run, 0)
    assert not srv.records


def test_batch_mode_resumes_across_a_restart(tmp_path: Path) -> None:
    run, _, shas = make_run(tmp_path, n=4, synthesize=False)  # no synthesize table: the render is the image
    ids = list(shas)
    with FakeOpenAI(api_key=KEY, batch_polls_to_complete=3) as srv:
        srv.inject("schema", times=1, match=lambda b: "response_format" in b and image_sha(b) == shas[ids[1]])
        with pytest.raises(BatchPending):
            Annotate(
                online(srv, batch=True, batch_max_wait_s=0.0),
                CATEGORIES,
                api_key=SecretStr(KEY),
                vlm_api_key=SecretStr(KEY),
            ).run_shard(run, 0)
        stats = Annotate(
            online(srv, batch=True, batch_max_wait_s=5.0),
            CATEGORIES,
            api_key=SecretStr(KEY),
            vlm_api_key=SecretStr(KEY),
        ).run_shard(run, 0)
    assert stats["ok"] == 4
    assert len(srv.batches) == 1  # the restarted run polled the same batch
    live_qa = [r.image_sha for r in srv.chat_records() if r.kind == "qa"]
    assert live_qa == [shas[ids[1]]]  # only the batch line that broke the schema was asked again live
    assert sorted(r.image_sha for r in srv.chat_records() if r.kind == "ground") == sorted(shas.values())
    rows = read(run)
    assert all(json.loads(r["annotate_provenance"])["batch"] for r in rows)


@pytest.mark.parametrize("batch", [False, True])
def test_a_key_echoed_inside_a_valid_answer_is_never_stored(tmp_path: Path, batch: bool) -> None:
    run, _, _ = make_run(tmp_path, n=3)
    with FakeOpenAI(api_key=KEY) as srv:
        srv.inject("echo_key", times=999)  # every answer, LLM and VLM, holds the Authorization header's key
        stats = Annotate(online(srv, batch=batch), CATEGORIES, api_key=SecretStr(KEY),
                         vlm_api_key=SecretStr(KEY)).run_shard(run, 0)
    assert stats["ok"] == 3 and stats["failed"] == 0
    assert all(r["description"].startswith("Bearer *** ") for r in read(run))
    files = [f for f in tmp_path.rglob("*") if f.is_file()]
    assert any("cache" in f.parts for f in files)
    assert not [f for f in files if KEY.encode() in f.read_bytes()]  # no cache entry, table or stats file


def test_redaction_spares_placeholder_keys_and_covers_every_configured_secret() -> None:
    from pointvl.core.chat_client import redact

    text = "EMPTY reply with sk-llm-0123456789 and vlm-key-9876543210"
    assert redact(text, SecretStr("EMPTY"), SecretStr("sk-llm-0123456789"), SecretStr("vlm-key-9876543210")) \
        == "EMPTY reply with *** and ***"


def test_a_grounding_outage_fails_the_items_and_redo_failed_asks_only_grounding_again(tmp_path: Path) -> None:
    run, _, _ = make_run(tmp_path, n=4)
    grounding = lambda b: b.get("response_format") is None  # noqa: E731
    with FakeOpenAI(api_key=KEY) as srv:
        srv.inject("500", times=999, match=grounding)  # the VLM server is down, the LLM is fine
        stats = Annotate(online(srv), CATEGORIES, api_key=SecretStr(KEY), vlm_api_key=SecretStr(KEY)).run_shard(run, 0)
        rows = read(run)
        assert stats["failed"] == stats["failed_vlm"] == 4 and stats["flagged"] == 0 and stats["ok"] == 0
        assert all(r["annotate_failure_reason"].startswith("vlm_failed: ") and r["qa"] is not None for r in rows)
        srv.faults.clear()  # the outage is over
        n_before = len(srv.chat_records())
        again = Annotate(online(srv, redo_failed=True), CATEGORIES, api_key=SecretStr(KEY),
                         vlm_api_key=SecretStr(KEY)).run_shard(run, 0)
        asked = srv.chat_records()[n_before:]
    assert again["ok"] == 4 and again["failed"] == 0 and again["flagged"] == 0
    assert len(asked) == 4 and all(r.kind != "qa" for r in asked)  # the QA replies came from the cache
