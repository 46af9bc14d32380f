"""Every QA pair is a prompt (training and prediction); log-probs without a full-vocabulary tensor; the CLI knobs."""

import json
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pytest
import torch

from pointvl.cli import main
from pointvl.core import io as pio
from pointvl.train.data import ShardExamples
from pointvl.train.model import selective_logps
from pointvl.train.pipeline import load
from pointvl.train.predict import predict
from pointvl.train.train_config import preset_config
from tests.train.conftest import make_record

ATTRIBUTES = [{"question": "What colour is it?", "choices": ["red", "grey"], "answer": "grey"},
              {"question": "Is it made of wood?", "choices": ["yes", "no"], "answer": "no"}]


@pytest.fixture(scope="module")
def qa_shards(tmp_path_factory) -> str:
    """Two test records, each with the category question and two attribute questions."""
    out = str(tmp_path_factory.mktemp("qa") / "shards")
    rows = []
    for i in range(2):
        r = make_record(i, "test", n_kpts=2)
        r["qa"] = json.dumps(json.loads(r["qa"]) + ATTRIBUTES)
        rows.append(r)
    pio.write_table(pio.join(out, "test-00000-of-00001.parquet"), pa.Table.from_pylist(rows))
    return out


def test_every_qa_pair_is_a_prompt_with_its_own_answer(qa_shards):
    cfg = preset_config("tiny", "sft", None).model
    examples = ShardExamples(qa_shards, "test", cfg.num_points, cfg.quant, shuffle=True, seed=3)
    got = list(examples)
    assert len(examples) == len(got) == 6
    assert sorted((e.instance_id, e.qa_index) for e in got) == sorted(
        (f"0300{i:04d}-m{i}-0", k) for i in range(2) for k in range(3))
    for e in got:
        qa = ([{"question": "What is the object?"}] + ATTRIBUTES)[e.qa_index]
        assert qa["question"] in e.instruction
        assert json.loads(e.target)["answer"] == e.reward_target["answer"]
    assert {json.loads(e.target)["answer"] for e in got if e.qa_index == 2} == {"no"}
    # a resumed pass starts mid-way without building what came before, and continues identically
    assert [(p, e.qa_index) for p, e in examples.iterate(4)] == [(p, e.qa_index) for p, e in examples.iterate()][4:]


def test_predict_asks_every_question_in_batches(qa_shards, tmp_path):
    cfg = preset_config("tiny", "sft", None)
    tokenizer, images, model = load(cfg, None)
    out = str(tmp_path / "predictions.jsonl")
    assert predict(model, tokenizer, images, qa_shards, out, max_new_tokens=4, batch_size=4) == 6
    lines = [json.loads(x) for x in Path(out).read_text().splitlines()]
    assert [(r["instance_id"][-4:], r["qa_index"]) for r in lines] == [
        (iid, k) for iid in ("m0-0", "m1-0") for k in (2, 1, 0)]  # the category question last per record


def test_selective_logps_match_the_full_log_softmax():
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 50, bias=False)
    hidden = torch.randn(3, 7, 8, requires_grad=True)
    ids = torch.randint(0, 50, (3, 7))
    full = torch.log_softmax(head(hidden), -1).gather(-1, ids[..., None]).squeeze(-1)
    chunked = selective_logps(head, hidden, ids, chunk=4)
    assert torch.allclose(chunked, full, atol=1e-6)
    g_full = torch.autograd.grad(full.sum(), [hidden, head.weight])
    g_chunk = torch.autograd.grad(chunked.sum(), [hidden, head.weight])
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(g_full, g_chunk, strict=True))


def _one_line(capsys, code: int, expected: str) -> None:
    err = capsys.readouterr().err.strip()
    assert code == 2 and expected in err and len(err.splitlines()) == 1, err


def test_cli_rejects_bad_knobs_in_one_line(short_shards_dir, tmp_path, capsys):
    base = ["train", "--shards", short_shards_dir, "--run", str(tmp_path / "run")]
    _one_line(capsys, main([*base, "--preset", "tiny", "--set", "sft.max_stepz=3"]), "sft.max_stepz")
    _one_line(capsys, main([*base, "--preset", "tiny", "--set", "grpo.lam=high"]), "grpo.lam")
    _one_line(capsys, main([*base, "--preset", "paper", "--set", "model.architecture=3b",
                            "--set", "model.random_init=true"]), "Point-BERT")
    _one_line(capsys, main([*base, "--preset", "tiny", "--config", str(tmp_path / "none.yaml")]), "not found")
    assert not (tmp_path / "run").exists()  # nothing started


def test_cli_train_then_predict_with_config_and_set(short_shards_dir, tmp_path):
    config = tmp_path / "train.yaml"
    config.write_text("sft: {batch_size: 1, per_device_batch_size: 1}\ngrpo.num_generations: 2\n"
                      "eval_max_new_tokens: 8\n")
    run = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "pointvl.cli", "train", "--shards", short_shards_dir, "--run", str(run), "--preset",
         "tiny", "--variant", "sft", "--config", str(config), "--set", "sft.max_steps=2", "--set", "sft.save_steps=1"],
        capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    saved = json.loads((run / "config.json").read_text())
    assert (saved["sft"]["max_steps"], saved["grpo"]["num_generations"], saved["eval_max_new_tokens"]) == (2, 2, 8)
    out = tmp_path / "pred.jsonl"
    assert main(["predict", "--shards", short_shards_dir, "--checkpoint", str(run / "sft"), "--out", str(out),
                 "--preset", "tiny", "--set", "eval_max_new_tokens=3", "--set", "eval_batch_size=1"]) == 0
    assert [json.loads(x)["qa_index"] for x in out.read_text().splitlines()] == [0]
