"""`pointvl evaluate` on hostile and odd input (issue 11 item 6) and the stated metrics (issue 15 item 2)."""

from __future__ import annotations

import json
import logging

import pytest
from sacrebleu.metrics import BLEU

from pointvl.cli import main
from pointvl.core import io as pio
from pointvl.core.errors import InputError
from pointvl.core.record import iter_records, target_text
from pointvl.core.spatial import QuantConfig
from pointvl.evaluation.predictions import read_predictions
from pointvl.evaluation.scoring import METRIC_KEYS, EvaluateConfig, evaluate, run
from pointvl.grca.verify import MAX_DEPTH, MAX_OUTPUT_CHARS, nesting_depth, output_limit


def _lines(path, rows) -> str:
    pio.write_bytes(str(path), "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows).encode())
    return str(path)


def _truth(shards: str, split: str = "test") -> list[dict]:
    return [{"instance_id": r["instance_id"], "output": target_text(r, QuantConfig()),
             "attribute_answers": [q["answer"] for q in json.loads(r["qa"])[1:]]} for r in iter_records(shards, split)]


def test_nesting_depth_counts_every_reading_of_the_quotes(eval_shards):
    valid = target_text(next(iter_records(eval_shards, "test")), QuantConfig())
    assert nesting_depth(valid) == 3
    assert nesting_depth('{"a": ' * 100) == 100
    assert nesting_depth('x "' + '{"a": ' * 100) >= 100  # objects that start inside what reads as a string
    assert nesting_depth('{"a": [ "]}", ' * 100) >= 100  # brackets hidden in strings of one reading
    assert nesting_depth("no brackets at all") == 0
    assert output_limit(valid) is None
    assert "over the limit" in output_limit("x" * (MAX_OUTPUT_CHARS + 1))
    assert "nest deeper" in output_limit("[" * (MAX_DEPTH + 1))


def test_deep_nesting_and_a_huge_unclosed_output_are_counted_unparsable(eval_shards, tmp_path):
    rows = _truth(eval_shards)
    ids = [r["instance_id"] for r in rows]
    rows[0]["output"] = '{"answer": ' + "[" * 100_000  # as text
    rows[1] = f'{{"instance_id": "{ids[1]}", "output": {"[" * 100_000}{"]" * 100_000}}}'  # as a JSON value
    rows[2]["output"] = '{"answer": "chair", "kpts2d": [' + "[1, 2], " * 1_250_000  # 10 MB, never closed
    preds = read_predictions(_lines(tmp_path / "p.jsonl", rows))
    assert preds[ids[1]].over_limit and "nests too deep" in preds[ids[1]].over_limit
    m = evaluate(eval_shards, preds)
    assert (m["n"], m["n_unparsable"], m["n_over_limit"], m["n_missing"]) == (8, 3, 3, 0)
    assert 0.6 < m["iou2d"] < 0.63  # the other 5 of 8 score near 1
    assert len(rows[2]["output"]) > 10_000_000


def test_an_output_object_is_scored_as_its_text(eval_shards, tmp_path):
    rows = _truth(eval_shards)
    as_text = evaluate(eval_shards, read_predictions(_lines(tmp_path / "t.jsonl", rows)))
    for r in rows:
        r["output"] = json.loads(r["output"])
    as_object = evaluate(eval_shards, read_predictions(_lines(tmp_path / "o.jsonl", rows)))
    assert {k: as_object[k] for k in METRIC_KEYS} == {k: as_text[k] for k in METRIC_KEYS}
    assert as_object["kpa3d"] == 1.0 and as_object["n_unparsable"] == 0


def test_other_output_types_and_malformed_lines_are_one_line_errors(eval_shards, tmp_path):
    bad = _lines(tmp_path / "l.jsonl", [{"instance_id": "x", "output": [1, 2]}])
    with pytest.raises(InputError, match="line 1: output must be the model's text or its JSON object, got list"):
        read_predictions(bad)
    with pytest.raises(InputError, match="holds no predictions"):
        read_predictions(_lines(tmp_path / "e.jsonl", []))
    blank = tmp_path / "blank.jsonl"
    blank.write_text("\n  \n")
    with pytest.raises(InputError, match="holds no predictions"):
        read_predictions(str(blank))
    deep = _lines(tmp_path / "d.jsonl", ["[" * 100_000])
    with pytest.raises(InputError, match="nests too deep to read and names no instance_id"):
        read_predictions(deep)


def test_duplicate_ids_give_one_warning_line(eval_shards, tmp_path, caplog):
    rows = _truth(eval_shards)
    with caplog.at_level(logging.WARNING, logger="pointvl.evaluation.scoring"):
        preds = read_predictions(_lines(tmp_path / "dup.jsonl", rows + [rows[0]] * 5000))
    assert len(preds) == 8
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "5000 lines repeat an earlier instance_id" in warnings[0].getMessage()


def test_no_matching_prediction_is_an_error_naming_the_split(eval_shards, tmp_path):
    with pytest.raises(InputError, match="are for the val split, not test: pass --split val"):
        evaluate(eval_shards, read_predictions(_lines(tmp_path / "v.jsonl", _truth(eval_shards, "val"))))
    with pytest.raises(InputError, match="none of the 1 predictions matches an instance_id of the test split"):
        evaluate(eval_shards, {"nobody": "{}"})
    # the val predictions score on the val split
    assert evaluate(eval_shards, read_predictions(str(tmp_path / "v.jsonl")), EvaluateConfig(split="val"))["n"] == 4


def test_cli_errors_are_one_line(eval_shards, tmp_path, capsys):
    out = str(tmp_path / "m.json")
    empty = _lines(tmp_path / "e.jsonl", [])
    nothing = _lines(tmp_path / "n.jsonl", [{"instance_id": "nobody", "output": "{}"}])
    for path, message in ((empty, "holds no predictions"), (nothing, "matches an instance_id")):
        assert main(["evaluate", "--shards", eval_shards, "--predictions", path, "--out", out]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0]
    assert not pio.exists(out)


def test_qa_accuracies_use_every_pair(eval_shards, tmp_path):
    rows = _truth(eval_shards)
    for k, r in enumerate(rows):
        if k < 2:
            r["attribute_answers"] = ["maybe", "grey"]  # one of two right
        if k == 2:
            r["output"] = r["output"].replace('"answer": "', '"answer": "not ')
    m = evaluate(eval_shards, read_predictions(_lines(tmp_path / "qa.jsonl", rows)))
    assert m["category_accuracy"] == pytest.approx(7 / 8)
    assert m["attribute_accuracy"] == pytest.approx(14 / 16)
    assert m["qa_accuracy"] == pytest.approx((7 + 14) / 24)
    assert m["n_attribute_questions"] == 16
    for r in rows:
        del r["attribute_answers"]
    m = evaluate(eval_shards, read_predictions(_lines(tmp_path / "qa0.jsonl", rows)))
    assert m["attribute_accuracy"] is None and "attribute_answers" in m["not_computed"]["attribute_accuracy"]
    assert m["qa_accuracy"] == m["category_accuracy"] == pytest.approx(7 / 8)


def test_bleu_is_sacrebleu_corpus_bleu_and_the_json_states_its_definitions(eval_shards, tmp_path):
    rows = _truth(eval_shards)
    refs = [r["description"] for r in iter_records(eval_shards, "test")]
    hyps = ["A small chair, 0.64 m tall." if k % 2 else refs[k] for k in range(len(rows))]
    for r, h in zip(rows, hyps, strict=True):
        r["output"] = r["output"].replace(json.dumps(json.loads(r["output"])["description"]), json.dumps(h))
    out = tmp_path / "m.json"
    m = run(eval_shards, _lines(tmp_path / "b.jsonl", rows), str(out), EvaluateConfig(per_category=True))
    for n in (1, 4):
        assert m[f"bleu{n}"] == pytest.approx(BLEU(max_ngram_order=n).corpus_score(hyps, [refs]).score / 100)
    assert 0 < m["bleu4"] < m["bleu1"] < 1
    saved = json.loads(out.read_text())
    assert "tok:13a" in saved["definitions"]["bleu_signature"] and saved["versions"]["sacrebleu"]
    assert saved["bertscore"] is None and saved["not_computed"]["bertscore"].startswith("BERTScore not computed")
    per = saved["per_category"]
    assert sorted(per) == ["car", "chair", "lamp", "table"] and all(per[c]["n"] == 2 for c in per)
    chair = [k for k, rec in enumerate(iter_records(eval_shards, "test")) if rec["category"] == "chair"]
    expected = BLEU(max_ngram_order=2).corpus_score([hyps[k] for k in chair], [[refs[k] for k in chair]])
    assert per["chair"]["bleu2"] == pytest.approx(expected.score / 100)


def test_one_line_per_qa_pair_scores_like_attribute_answers(eval_shards, tmp_path):
    """`pointvl predict` of a checkpoint writes a line per QA pair (``qa_index``): the same scores as one line
    per record with ``attribute_answers``."""
    rows = _truth(eval_shards)
    rows[0]["attribute_answers"] = ["maybe", rows[0]["attribute_answers"][1]]
    per_pair = []
    for r in rows:
        for k, answer in enumerate(r["attribute_answers"], 1):
            per_pair.append({"instance_id": r["instance_id"], "qa_index": k,
                             "output": json.dumps({"answer": answer, "description": ""})})
        per_pair.append({"instance_id": r["instance_id"], "qa_index": 0, "output": r["output"]})
    one = evaluate(eval_shards, read_predictions(_lines(tmp_path / "one.jsonl", rows)))
    pairs = evaluate(eval_shards, read_predictions(_lines(tmp_path / "pairs.jsonl", per_pair)))
    keys = ("category_accuracy", "attribute_accuracy", "qa_accuracy", "iou2d", "bleu4")
    assert {k: pairs[k] for k in keys} == {k: one[k] for k in keys} and one["attribute_accuracy"] < 1
