"""`pointvl report` and the reference predictors (issue 15 items 3-5)."""

from __future__ import annotations

import io
import json

import pytest
from PIL import Image

from pointvl.cli import main
from pointvl.core import io as pio
from pointvl.core.errors import InputError
from pointvl.evaluation.predict_reference import write_reference
from pointvl.evaluation.predictions import read_predictions
from pointvl.evaluation.report import parse_runs, report, tables
from pointvl.evaluation.scoring import evaluate


@pytest.fixture(scope="module")
def references(eval_shards, tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("refs")
    paths = {name: str(root / f"{name}.jsonl") for name in ("ground-truth", "mean-box")}
    for name, path in paths.items():
        assert write_reference(name, eval_shards, path) == 8
    return paths


def test_reference_rows_bracket_the_scale(eval_shards, references):
    truth = evaluate(eval_shards, read_predictions(references["ground-truth"]))
    base = evaluate(eval_shards, read_predictions(references["mean-box"]))
    for key in ("iou2d", "iou3d", "rpc"):
        assert truth[key] > 0.98 and 0 < base[key] < truth[key], key
    for key in ("kpa2d", "kpa3d", "category_accuracy", "attribute_accuracy", "bleu4", "rougeL"):
        assert truth[key] == pytest.approx(1.0), key
    assert base["category_accuracy"] == pytest.approx(2 / 8)  # the most frequent train answer: one category
    assert base["attribute_accuracy"] == pytest.approx(0.75)  # "grey" always right, the yes/no half the time
    assert base["n_unparsable"] == 0 and truth["n_unparsable"] == 0


def _history(folder, stage: str, rewards: bool) -> None:
    rows = [{"step": s, "loss": 1.0 / s, **({"reward_format": 0.1 * s, "reward_rpc": 0.05 * s} if rewards else {})}
            for s in range(1, 6)]
    pio.write_json(str(folder / stage / "history.json"), rows)


def test_report_writes_paper_tables_plots_and_one_json_per_run(eval_shards, references, tmp_path):
    train_run = tmp_path / "train"
    _history(train_run, "sft", False)
    _history(train_run, "grpo_grca_rpc", True)
    out = tmp_path / "report"
    runs = {"ground truth": references["ground-truth"], "mean box": references["mean-box"]}
    text = report(eval_shards, str(out), runs, train_run=str(train_run))
    assert (out / "report.md").read_text() == text
    for header in ("| Model | IoU2D | KPA-2D |", "| Model | IoU3D | KPA-3D | RPC |",
                   "| Method | IoU2D | IoU3D | KPA-2D | KPA-3D | RPC |",
                   "| Model | B-1 | B-2 | B-3 | B-4 | R-1 | R-2 | R-L | BERTScore | QA Acc. |",
                   "| Model | Category | Attribute | All QA |"):
        assert header in text
    saved = {name: json.loads((out / f"{name}.json").read_text()) for name in runs}
    row = next(line for line in text.splitlines() if line.startswith("| mean box |"))
    m = saved["mean box"]
    (lo2, hi2), (lok, hik) = m["intervals"]["iou2d"], m["intervals"]["kpa2d"]
    assert row == f"| mean box | {m['iou2d']:.3f} [{lo2:.3f}, {hi2:.3f}] | {m['kpa2d']:.3f} [{lok:.3f}, {hik:.3f}] |"
    assert "BERTScore not computed" in text
    for name in ("metrics.png", "per_category.png", "iou_hist.png", "training_curves.png"):
        assert f"]({name})" in text
        image = Image.open(io.BytesIO((out / name).read_bytes()))
        assert image.format == "PNG" and image.size[0] > 300
    assert sorted(saved["mean box"]["per_category"]) == ["car", "chair", "lamp", "table"]


def test_tables_show_three_decimals_and_dashes_for_what_is_not_computed():
    metrics = {k: 0.12345 for k in ("iou2d", "iou3d", "kpa2d", "kpa3d", "rpc", "bleu1", "bleu2", "bleu3", "bleu4",
                                     "rouge1", "rouge2", "rougeL", "category_accuracy", "qa_accuracy")}
    metrics.update(attribute_accuracy=None, bertscore=None, n=3, n_unparsable=1, n_over_limit=0, n_missing=0,
                   not_computed={"bertscore": "no model"})
    text = tables({"run": metrics})
    assert "| run | 0.123 | 0.123 |" in text and "| run | 0.123 | – | 0.123 |" in text
    assert "bertscore: no model" in text


def test_run_names_and_splits_are_checked_with_one_line(eval_shards, references, tmp_path, capsys):
    with pytest.raises(InputError, match="run name 'a' is used twice"):
        parse_runs(["a=x.jsonl", "a=y.jsonl"])
    with pytest.raises(InputError, match="expected NAME=PREDICTIONS.jsonl"):
        parse_runs(["just-a-path.jsonl"])
    val = str(tmp_path / "val.jsonl")
    write_reference("ground-truth", eval_shards, val, split="val")
    out = str(tmp_path / "r")
    cases = [
        (["--run", f"a={references['ground-truth']}", "--run", f"a={references['mean-box']}"], "is used twice"),
        (["--run", f"gt={references['ground-truth']}", "--run", f"val={val}"], "are for the val split, not test"),
        (["--run", f"gt={tmp_path / 'none.jsonl'}"], "predictions file not found"),
    ]
    for extra, message in cases:
        assert main(["report", "--shards", eval_shards, "--out", out, *extra]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
    assert main(["report", "--shards", eval_shards, "--out", out, "--run", f"gt={references['ground-truth']}"]) == 0
    assert "**Table 3: all geometric metrics (ablations)**" in capsys.readouterr().out
