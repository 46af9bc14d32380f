import json

import numpy as np
import pytest

from pointvl.cli import main
from pointvl.core import io as pio
from pointvl.core.record import iter_records, target_text
from pointvl.core.spatial import QuantConfig
from pointvl.evaluation.predictions import read_predictions
from pointvl.evaluation.scoring import COUNT_KEYS, METRIC_KEYS, OPTIONAL_KEYS, EvaluateConfig, evaluate, format_table


def _write_predictions(path, rows):
    pio.write_bytes(str(path), "".join(json.dumps(r) + "\n" for r in rows).encode())


def test_perfect_predictions_score_one(shards_dir, tmp_path):
    quant = QuantConfig()
    records = list(iter_records(shards_dir, "test"))
    preds = {r["instance_id"]: target_text(r, quant) for r in records}
    m = evaluate(shards_dir, preds, EvaluateConfig())
    assert m["n"] == len(records) == 4 and m["n_missing"] == 0 and m["n_unparsable"] == 0
    # quantization to 1000 bins moves a box by at most half a bin: IoU stays near 1
    for k in ("iou2d", "iou3d", "rpc"):
        assert 0.98 < m[k] <= 1.0, (k, m[k])
    for k in ("kpa2d", "kpa3d", "qa_accuracy", "bleu1", "bleu4", "rouge1", "rouge2", "rougeL"):
        assert m[k] == pytest.approx(1.0), k


def test_unparsable_missing_and_wrong_answers(shards_dir):
    quant = QuantConfig()
    records = list(iter_records(shards_dir, "test"))
    good = json.loads(target_text(records[0], quant))
    good["answer"] = "not a category"
    preds = {
        records[0]["instance_id"]: json.dumps(good),
        records[1]["instance_id"]: "I cannot answer that.",
        records[2]["instance_id"]: target_text(records[2], quant),
        "unknown-id": "{}",
    }
    m = evaluate(shards_dir, preds)
    assert (m["n"], m["n_unparsable"], m["n_missing"]) == (4, 1, 1)
    assert m["qa_accuracy"] == pytest.approx(0.25)
    assert m["kpa3d"] == pytest.approx(0.5)  # two of four instances predicted every keypoint inside
    assert all(0.0 <= m[k] <= 1.0 for k in METRIC_KEYS)


def test_rpc_is_consistency_not_accuracy(shards_dir):
    """A prediction whose boxes are both wrong but mutually consistent keeps RPC while IoU drops."""
    quant = QuantConfig()
    rec = next(iter_records(shards_dir, "test"))
    out = json.loads(target_text(rec, quant))
    shifted = np.asarray(rec["bbox3d"]) + np.array([0.3, 0, 0, 0.3, 0, 0])
    from pointvl.core.spatial import project_box3d

    b2 = project_box3d(shifted, np.asarray(rec["K"]), np.asarray(rec["R"]), np.asarray(rec["t"]))
    out["bbox3d"] = quant.quantize_3d(shifted).tolist()
    out["bbox2d"] = quant.quantize_2d(b2, rec["width"], rec["height"]).tolist()
    m = evaluate(shards_dir, {rec["instance_id"]: json.dumps(out)})
    assert m["rpc"] * m["n"] > 0.97  # the one prediction is consistent
    assert m["iou3d"] * m["n"] < 0.6


def test_cli_writes_metrics_and_table(shards_dir, tmp_path, capsys):
    quant = QuantConfig()
    records = iter_records(shards_dir, "test")
    rows = [{"instance_id": r["instance_id"], "output": target_text(r, quant)} for r in records]
    rows.append(rows[0])  # a duplicate line keeps the last one
    pred = tmp_path / "pred.jsonl"
    _write_predictions(pred, rows)
    assert len(read_predictions(str(pred))) == 4
    out = tmp_path / "metrics.json"
    assert main(["evaluate", "--shards", shards_dir, "--predictions", str(pred), "--out", str(out)]) == 0
    metrics = json.loads(out.read_text())
    # issue 15: the evaluation JSON also states the optional metrics, what was not computed, the split,
    # the bins, the metric definitions and the package versions
    assert set(metrics) == set(METRIC_KEYS) | set(OPTIONAL_KEYS) | set(COUNT_KEYS) | {
        "not_computed", "split", "bins", "definitions", "versions", "intervals"}
    printed = capsys.readouterr().out
    assert "| Method | IoU2D | IoU3D | KPA-2D | KPA-3D | RPC |" in printed
    assert format_table(metrics) in printed
