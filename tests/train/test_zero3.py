"""DeepSpeed ZeRO-3 for real, on 2 CPU processes (``pointvl/configs/train/zero3_cpu.yaml``).

The ``checkpoint`` architecture, as the paper preset loads Qwen2.5-VL-3B-Instruct: a tiny Qwen2.5-VL and
its tokenizer written with ``save_pretrained``, read back by ``from_pretrained``, Point-BERT from a saved
checkpoint. ``pointvl train`` runs SFT -> GRPO -> predict under ``accelerate launch`` with ZeRO-3 and in one
plain process; the two must agree (the global batch is the same, both in float32).

The GRPO stage runs every ZeRO-3 path (rollouts on the gathered policy, log-probabilities through the engine,
backward, step, checkpoint), but on this untrained policy every completion scores 0, so the standardised
advantages and GRPO's gradient are 0: its rows agree trivially in loss; its rollouts agree token for token.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from train.test_distributed import ACCELERATE, CONFIGS, ROOT, _free_port

from pointvl.train.model import tiny_qwen_config
from pointvl.train.point_bert import PointBERT
from pointvl.train.tokenizer import build_char_tokenizer

# the tiny preset's Point-BERT sizes (pointvl.train.train_config.tiny_preset)
POINT_BERT = {"trans_dim": 32, "depth": 2, "num_heads": 2, "num_group": 16, "group_size": 16, "encoder_dims": 64}
LOSS_TOLERANCE = 1e-4  # measured: 0.0 (SFT losses equal to the printed digit); weights differ by < 1e-6
WEIGHT_TOLERANCE = 1e-5


def write_checkpoint(root: Path) -> tuple[Path, Path]:
    """A tiny Qwen2.5-VL folder (``save_pretrained``: config, safetensors, tokenizer) and a Point-BERT.pth."""
    import transformers as tf

    from pointvl.train.point_bert import PointBertConfig

    tok = build_char_tokenizer()
    ids = tok.convert_tokens_to_ids
    special = {"image_token_id": ids("<|image_pad|>"), "video_token_id": ids("<|video_pad|>"),
               "vision_start_token_id": ids("<|vision_start|>"), "vision_end_token_id": ids("<|vision_end|>")}
    eos = ids("<|im_end|>")
    torch.manual_seed(0)
    config = tiny_qwen_config(len(tok), special, {"bos_token_id": eos, "eos_token_id": eos,
                                                  "pad_token_id": tok.pad_token_id})
    folder = root / "qwen2.5-vl-tiny"
    tf.Qwen2_5_VLForConditionalGeneration(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    encoder = PointBERT(PointBertConfig(**POINT_BERT))
    point_bert = root / "Point-BERT.pth"  # the released layout: base_model, module.transformer_q. prefixes
    torch.save({"base_model": {f"module.transformer_q.{k}": v for k, v in encoder.state_dict().items()}}, point_bert)
    return folder, point_bert


def _train_args(shards: str, run: Path, folder: Path, point_bert: Path) -> list[str]:
    sets = ["model.architecture=checkpoint", f"model.checkpoint={folder}", f"model.point_bert.checkpoint={point_bert}",
            "model.point_bert.random_init=false", "sft.batch_size=4", "sft.per_device_batch_size=2",
            "sft.max_steps=2", "sft.max_grad_norm=0.7", "grpo.max_grad_norm=0.3", "grpo.prompts_per_step=2",
            "grpo.num_generations=2", "grpo.max_new_tokens=8", "grpo.max_steps=1", "eval_max_new_tokens=4"]
    return ["-m", "pointvl.cli", "train", "--shards", shards, "--run", str(run), "--preset", "tiny",
            *[x for s in sets for x in ("--set", s)]]


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def _history(run: Path, stage: str) -> list[dict]:
    return json.loads((run / stage / "history.json").read_text())


def test_checkpoint_architecture_under_zero3_on_two_cpu_processes_equals_one_process(shards_dir, tmp_path):
    folder, point_bert = write_checkpoint(tmp_path)
    one, two = tmp_path / "one", tmp_path / "two"
    # both at once: most of each run's wall time is start-up (imports, the process group)
    procs = [
        subprocess.Popen([sys.executable, *_train_args(shards_dir, one, folder, point_bert)], env=_env(), cwd=ROOT,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True),
        subprocess.Popen([ACCELERATE, "launch", "--config_file", str(CONFIGS / "zero3_cpu.yaml"), "--num_processes",
                          "2", "--main_process_port", str(_free_port()),
                          *_train_args(shards_dir, two, folder, point_bert)], env=_env(), cwd=ROOT,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True),
    ]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outputs, strict=True):
        assert p.returncode == 0, out[-4000:]

    # ZeRO-3 really ran: the engine's checkpoint holds one partition per rank
    final = two / "grpo_grca_rpc" / "checkpoint-1"
    parts = {p.name for p in (final / "global_step1").iterdir()}
    assert {"zero_pp_rank_0_mp_rank_00_model_states.pt", "zero_pp_rank_1_mp_rank_00_model_states.pt"} <= parts
    assert {r["stage"]: r["processes"] for r in json.loads((two / "compute.json").read_text())} == {
        "sft": 2, "grpo_grca_rpc": 2}
    # each stage's max_grad_norm was the engine's gradient_clipping (the engine records its config)
    for folder, norm in ((two / "sft" / "checkpoint-2" / "global_step2", 0.7), (final / "global_step1", 0.3)):
        state = torch.load(folder / "zero_pp_rank_0_mp_rank_00_model_states.pt", weights_only=False)
        assert state["ds_config"]["gradient_clipping"] == norm

    # the same losses as one process; the same samples, rollouts and predictions
    for stage in ("sft", "grpo_grca_rpc"):
        a, b = _history(one, stage), _history(two, stage)
        assert [r["loss"] for r in b] == pytest.approx([r["loss"] for r in a], abs=LOSS_TOLERANCE)
        keys = [k for k in a[0] if k in ("tokens", "generated_tokens") or k.startswith("reward_")]
        assert [{k: r[k] for k in keys} for r in b] == [{k: r[k] for k in keys} for r in a]
    assert len({r["loss"] for r in _history(two, "sft")}) == 2  # it trained
    lines = [(two / "eval" / "predictions.jsonl"), (one / "eval" / "predictions.jsonl")]
    assert [json.loads(x) for x in lines[0].read_text().splitlines()] == [
        json.loads(x) for x in lines[1].read_text().splitlines()]

    # the final checkpoint (float32, consolidated from the engine's partitions) loads with from_pretrained
    from transformers import Qwen2_5_VLForConditionalGeneration

    lm, info = Qwen2_5_VLForConditionalGeneration.from_pretrained(final, output_loading_info=True)
    assert not info["missing_keys"] and not info["mismatched_keys"]
    reference = load_file(one / "grpo_grca_rpc" / "checkpoint-1" / "model.safetensors")
    state = lm.state_dict()
    diff = max((state[k] - v).abs().max().item() for k, v in reference.items() if k in state)
    assert diff < WEIGHT_TOLERANCE, diff
    saved = load_file(final / "model.safetensors")
    assert set(saved) == set(reference)  # the point encoder and the fusion modules too


def test_whole_parameters_lifts_the_zero3_registration_and_restores_it():
    """What a DeepSpeed Accelerator leaves registered for the process (stage_setup.whole_parameters' docstring)."""
    from transformers.integrations import HfDeepSpeedConfig, is_deepspeed_zero3_enabled, unset_hf_deepspeed_config

    from pointvl.train.stage_setup import whole_parameters

    registered = HfDeepSpeedConfig({"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": 1})
    try:
        assert is_deepspeed_zero3_enabled()
        with whole_parameters():
            assert not is_deepspeed_zero3_enabled()  # from_pretrained builds whole, generate syncs no ranks
        assert is_deepspeed_zero3_enabled() and registered.is_zero3()
    finally:
        unset_hf_deepspeed_config()
    with whole_parameters():  # nothing registered: nothing to lift
        assert not is_deepspeed_zero3_enabled()
