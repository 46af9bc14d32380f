"""Checkpoints: the Trainer layout, transformers loads the language model, SIGKILL then resume = uninterrupted."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pointvl.train import checkpoint as ckpt
from pointvl.train.data import Collator, ShardExamples
from pointvl.train.model import build_image_processor
from pointvl.train.pipeline import load
from pointvl.train.sft import run_sft
from pointvl.train.train_config import preset_config

SFT = {"batch_size": 2, "per_device_batch_size": 1, "max_steps": 3, "save_steps": 2, "save_total_limit": None}
DIST_RUN = str(Path(__file__).with_name("dist_run.py"))


def test_trainer_layout_and_transformers_loads_the_language_model(shards_dir, tmp_path):
    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

    cfg = preset_config("tiny", "sft", {"sft": SFT})
    tokenizer, images, model = load(cfg, None)
    stage = str(tmp_path / "sft")
    history = run_sft(model, tokenizer, images, shards_dir, cfg.sft, stage)
    assert ckpt.checkpoint_steps(stage) == [2, 3]  # every save_steps and at the end
    folder = Path(stage) / "checkpoint-3"
    for name in ("model.safetensors", "config.json", "generation_config.json", "optimizer.pt", "scheduler.pt",
                 "rng_state.pth", "trainer_state.json", "tokenizer.json"):
        assert (folder / name).is_file(), name
    state = json.loads((folder / "trainer_state.json").read_text())
    assert state["global_step"] == 3 and len(state["log_history"]) == 3 and state["log_history"] == history
    assert all({"step", "loss", "learning_rate"} <= set(r) for r in state["log_history"])
    weights = load_file(str(folder / "model.safetensors"))
    assert weights["cross_attn.q_proj_weight"].dtype == torch.float32

    lm = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(folder))
    for name, tensor in model.lm.state_dict().items():
        assert torch.equal(lm.state_dict()[name], tensor), name
    assert AutoTokenizer.from_pretrained(str(folder)).encode("<|point_pad|>") == tokenizer.encode("<|point_pad|>")

    # the point and fusion modules load beside it: the rebuilt policy computes what the trained one does
    tok2, policy = ckpt.load_policy(str(folder))
    examples = list(ShardExamples(shards_dir, "test", cfg.model.num_points, cfg.model.quant, shuffle=False))[:2]
    batch = Collator(tok2, build_image_processor(policy.config), policy.num_point_tokens, True)(examples)
    with torch.no_grad():
        assert torch.equal(policy(**batch).logits, model(**batch).logits)


KILLED = textwrap.dedent("""
    import os, signal, sys
    from pointvl.core import io as pio
    from pointvl.train.train_config import parse_overrides, preset_config
    from pointvl.train.pipeline import train_stage

    write_json = pio.write_json

    def write_json_then_die(path, obj):  # SIGKILL while checkpoint-6 is being written (its weights are out)
        if path.endswith("checkpoint-6/trainer_state.json"):
            os.kill(os.getpid(), signal.SIGKILL)
        write_json(path, obj)

    if sys.argv[3] == "kill":
        pio.write_json = write_json_then_die
    cfg = preset_config("tiny", "sft", parse_overrides(sys.argv[4:]))
    train_stage(cfg, sys.argv[1], sys.argv[2], "sft", None)
""")


def test_sigkill_then_resume_ends_with_the_uninterrupted_weights(shards_dir, tmp_path):
    pairs = ["sft.batch_size=2", "sft.per_device_batch_size=1", "sft.max_steps=8", "sft.save_steps=2",
             "sft.save_total_limit=2"]
    env = {**os.environ, "PYTHONPATH": os.getcwd(), "OMP_NUM_THREADS": "1"}
    run = str(tmp_path / "run")

    def child(mode: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", KILLED, shards_dir, run, mode, *pairs], env=env,
                              capture_output=True, text=True, timeout=600)

    killed = child("kill")
    assert killed.returncode == -9, killed.stderr[-2000:]
    sft = Path(run) / "sft"
    assert ckpt.checkpoint_steps(str(sft)) == [2, 4]  # checkpoint-6 is incomplete: not a checkpoint
    assert (sft / "checkpoint-6" / "model.safetensors").exists() and not (sft / "history.json").exists()
    resumed = child("resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert ckpt.checkpoint_steps(str(sft)) == [6, 8]  # save_total_limit 2
    history = json.loads((sft / "history.json").read_text())
    assert [r["step"] for r in history] == list(range(1, 9))

    out = str(tmp_path / "straight.json")
    straight = subprocess.run([sys.executable, DIST_RUN, shards_dir, "", out, "sft", *pairs], env=env,
                              capture_output=True, text=True, timeout=600)
    assert straight.returncode == 0, straight.stderr[-2000:]
    expected = load_file(out + ".safetensors")
    final = load_file(str(sft / "checkpoint-8" / "model.safetensors"))
    diff = max((final[k.removeprefix("lm.")] - v).abs().max().item() for k, v in expected.items())
    assert diff <= 1e-6, diff
    losses = [r["loss"] for r in json.loads(Path(out).read_text())["history"]]
    assert [r["loss"] for r in history] == pytest.approx(losses, abs=1e-6)


def test_grpo_resumes_at_its_prompt_with_the_same_samples(shards_dir, tmp_path):
    """Rollouts are seeded by the prompt's position: a resumed stage samples what the first run would have."""
    import shutil

    from pointvl.train.grpo import run_grpo

    cfg = preset_config("tiny", "grca_rpc", {"grpo": {"prompts_per_step": 2, "num_generations": 2,
                                                      "max_new_tokens": 12, "max_steps": 3, "save_steps": 1,
                                                      "save_total_limit": None, "temperature": 1.5}})
    stage = str(tmp_path / "grpo")
    tokenizer, images, model = load(cfg, None)
    straight = run_grpo(model, tokenizer, images, shards_dir, cfg.grpo, stage)
    shutil.rmtree(Path(stage) / "checkpoint-3")
    shutil.rmtree(Path(stage) / "checkpoint-2")
    tokenizer, images, model = load(cfg, None)
    resumed = run_grpo(model, tokenizer, images, shards_dir, cfg.grpo, stage)
    keep = ("step", "samples", "generated_tokens", "tokens", "loss")
    assert [{k: r[k] for k in keep} for r in resumed] == [{k: r[k] for k in keep} for r in straight]
    assert len({r["generated_tokens"] for r in straight}) > 1  # lengths differ by prompt: the check has teeth
