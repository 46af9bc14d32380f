"""`pointvl predict --endpoint` against a real OpenAI-compatible HTTP server on 127.0.0.1 (tests/fake_openai.py)."""

from __future__ import annotations

import json
import socket

import pytest
from fake_openai import FakeOpenAI, first_image, prompt_text

from pointvl.cli import main
from pointvl.core.errors import InputError
from pointvl.core.record import iter_records
from pointvl.evaluation.predict_endpoint import EndpointConfig, predict_endpoint
from pointvl.evaluation.predictions import read_predictions
from pointvl.evaluation.scoring import EvaluateConfig, evaluate

KEY = "sk-eval-test"


def _config(srv: FakeOpenAI, coords: str, **kw) -> EndpointConfig:
    return EndpointConfig(base_url=srv.base_url, model="fake-vlm", coords=coords, api_key_env="EVAL_TEST_KEY",
                          concurrency=4, max_retries=0, **kw)


@pytest.fixture(autouse=True)
def _key(monkeypatch):
    monkeypatch.setenv("EVAL_TEST_KEY", KEY)


@pytest.mark.parametrize("coords", ["bins", "norm1000", "qwen2.5-vl"])
def test_each_coordinate_convention_lands_on_the_benchmark_bins(eval_shards, tmp_path, coords):
    out = str(tmp_path / "p.jsonl")
    with FakeOpenAI(api_key=KEY, vlm_convention=coords) as srv:
        counts = predict_endpoint(eval_shards, out, _config(srv, coords))
        bodies = [r.body for r in srv.paid()]
    assert counts == {"n": 8, "api_calls": 8, "cache_hits": 0, "failed": 0}
    records = {r["instance_id"]: r for r in iter_records(eval_shards, "test")}
    for body in bodies:  # the standard image_url part carries the record's PNG; the text its questions
        part = body["messages"][0]["content"][0]
        assert part["type"] == "image_url" and part["image_url"]["url"].startswith("data:image/png;base64,")
        assert first_image(body) in {r["image"] for r in records.values()}
        assert "Is it boxy? (choices: yes, no)" in prompt_text(body) and body["temperature"] == 0.0
    m = evaluate(eval_shards, read_predictions(out), EvaluateConfig(num_keypoints=None))  # the fake writes 2
    assert m["iou2d"] > 0.93 and m["kpa2d"] == 1.0, (coords, m["iou2d"])
    assert m["n_unparsable"] == 0 and m["attribute_accuracy"] is not None
    assert m["category_accuracy"] == pytest.approx(2 / 8)  # the fake answers the first of 4 choices


def test_a_wrong_convention_costs_iou(eval_shards, tmp_path):
    """The same replies read as bins instead of Qwen2.5-VL pixels score lower: the conversion matters."""
    scores = {}
    with FakeOpenAI(api_key=KEY, vlm_convention="qwen2.5-vl") as srv:
        for coords in ("qwen2.5-vl", "bins"):
            out = str(tmp_path / f"{coords}.jsonl")
            predict_endpoint(eval_shards, out, _config(srv, coords, cache_dir=str(tmp_path / coords)))
            scores[coords] = evaluate(eval_shards, read_predictions(out))["iou2d"]
    assert scores["qwen2.5-vl"] > 0.93 and scores["bins"] < 0.5


def test_a_rerun_sends_nothing_new_and_no_json_is_unparsable(eval_shards, tmp_path):
    out = str(tmp_path / "p.jsonl")
    with FakeOpenAI(api_key=KEY, vlm_convention="bins") as srv:
        srv.inject("no_json", times=1)
        srv.inject("500", times=1)  # with max_retries=0 this request fails: an error line, not cached
        first = predict_endpoint(eval_shards, out, _config(srv, "bins"))
        lines = [json.loads(x) for x in open(out)]
        assert first["failed"] == 1 and sum("error" in x for x in lines) == 1
        m = evaluate(eval_shards, read_predictions(out))
        assert m["n_unparsable"] == 2 and m["n_missing"] == 0
        paid = len(srv.paid())
        again = predict_endpoint(eval_shards, out, _config(srv, "bins"))
        assert again == {"n": 8, "api_calls": 1, "cache_hits": 7, "failed": 0}  # only the failed one is asked
        assert len(srv.paid()) == paid + 1
        third = predict_endpoint(eval_shards, out, _config(srv, "bins"))
        assert third["api_calls"] == 0 and len(srv.paid()) == paid + 1
    assert evaluate(eval_shards, read_predictions(out))["n_unparsable"] == 1  # the cached prose reply


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_endpoint_problems_are_one_line(eval_shards, tmp_path, capsys):
    out = str(tmp_path / "p.jsonl")
    dead = EndpointConfig(base_url=f"http://127.0.0.1:{_free_port()}/v1", model="m", max_retries=0)
    with pytest.raises(InputError, match="cannot reach the endpoint"):
        predict_endpoint(eval_shards, out, dead)
    with FakeOpenAI(api_key=KEY) as srv:
        with pytest.raises(InputError, match="refused the key in \\$OTHER_KEY"):
            predict_endpoint(eval_shards, out, EndpointConfig(base_url=srv.base_url, model="fake-vlm",
                                                              api_key_env="OTHER_KEY", max_retries=0))
        args = ["predict", "--endpoint", srv.base_url, "--model", "gpt-none", "--api-key-env", "EVAL_TEST_KEY",
                "--shards", eval_shards, "--out", out]
        assert main(args) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "does not serve 'gpt-none'" in err[0]
        assert main([*args[:4], "fake-vlm", *args[5:], "--coords", "norm1000", "--concurrency", "2"]) == 0
        assert "wrote 8 predictions of fake-vlm" in capsys.readouterr().out
        assert {r.kind for r in srv.paid()} == {"predict"}
    lines = [json.loads(x) for x in open(out)]
    assert len(lines) == 8 and all(set(x) >= {"instance_id", "output", "attribute_answers", "raw"} for x in lines)
