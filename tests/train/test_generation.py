"""Generation is explicit: a checkpoint's generation_config.json reaches neither generate nor our checkpoints."""

import json
from pathlib import Path

import pytest
import torch
from tiny_checkpoint import QWEN_CHAT_GENERATION, write_tiny_qwen_checkpoint
from transformers import GenerationConfig
from transformers.generation import logits_process as lp

from pointvl.train.data import Collator, ShardExamples
from pointvl.train.generation import STOP_TOKEN, greedy_config
from pointvl.train.grpo import rollout
from pointvl.train.pipeline import load
from pointvl.train.predict import predict
from pointvl.train.sft import run_sft
from pointvl.train.train_config import preset_config

GRPO = {"temperature": 0.7, "top_p": 1.0, "top_k": 0, "num_generations": 3, "max_new_tokens": 6}


@pytest.fixture(scope="module")
def chat_checkpoint(tmp_path_factory) -> str:
    folder = write_tiny_qwen_checkpoint(str(tmp_path_factory.mktemp("qwen") / "tiny-qwen"))
    saved = json.loads((Path(folder) / "generation_config.json").read_text())
    assert {k: saved[k] for k in QWEN_CHAT_GENERATION} == QWEN_CHAT_GENERATION  # the settings to be ignored
    return folder


def _config(folder: str, **grpo):
    return preset_config("tiny", "grca_rpc", {"model": {"architecture": "checkpoint", "checkpoint": folder},
                                              "grpo": {**GRPO, **grpo}})


def _record_processors(lm) -> list:
    """Wrap the language model's own ``_get_logits_processor``: (generation config used, processors built)."""
    calls, build = [], lm._get_logits_processor

    def recording(generation_config, *args, **kwargs):
        processors = build(generation_config, *args, **kwargs)
        calls.append((generation_config, list(processors)))
        return processors

    lm._get_logits_processor = recording
    return calls


def _batch(cfg, tokenizer, images, model, shards, split="train", n=1, **kwargs):
    examples = list(ShardExamples(shards, split, cfg.model.num_points, cfg.model.quant, shuffle=False))[:n]
    return examples, Collator(tokenizer, images, model.num_point_tokens, **kwargs)(examples)


def test_the_checkpoints_sampling_settings_do_not_reach_generate(chat_checkpoint, shards_dir, tmp_path):
    cfg = _config(chat_checkpoint)
    tokenizer, images, model = load(cfg, None)
    assert model.lm.generation_config.to_diff_dict().keys() & set(QWEN_CHAT_GENERATION) == set()  # dropped at load
    calls = _record_processors(model.lm)

    # control: a config that leaves the penalty unset inherits the checkpoint's (transformers' merge, line 2108)
    model.lm.generation_config = GenerationConfig.from_pretrained(chat_checkpoint)
    examples, inputs = _batch(cfg, tokenizer, images, model, shards_dir, with_targets=False)
    model.generate(**inputs, generation_config=GenerationConfig(max_new_tokens=2))
    used, processors = calls.pop()
    assert used.repetition_penalty == 1.05 and any(isinstance(p, lp.RepetitionPenaltyLogitsProcessor)
                                                   for p in processors)
    tokenizer, images, model = load(cfg, None)
    calls = _record_processors(model.lm)

    # 1. rollouts: the train config's sampling, nothing else
    ids, mask, _, _, _ = rollout(model, tokenizer, inputs, examples[0], cfg.grpo, seed=0)
    assert ids.shape[0] == GRPO["num_generations"]
    used, processors = calls.pop()
    assert (used.do_sample, used.temperature, used.top_p, used.top_k, used.repetition_penalty) == (
        True, 0.7, 1.0, 0, 1.0)
    assert {type(p) for p in processors} == {lp.SuppressTokensLogitsProcessor, lp.TemperatureLogitsWarper}
    # the distribution sampled from is softmax(logits / 0.7) with the point tokens removed, computed here
    logits = torch.randn(2, len(tokenizer))
    processed = logits.clone()
    for p in processors:
        processed = p(torch.zeros(2, 1, dtype=torch.long), processed)
    expected = logits / 0.7
    expected[:, model.point_token_ids] = -float("inf")
    assert torch.allclose(processed.log_softmax(-1), expected.log_softmax(-1))

    # 2. predict: greedy, no penalty; the answer is the argmax of the policy's logits at every step
    out = tmp_path / "predictions.jsonl"
    predict(model, tokenizer, images, shards_dir, str(out), max_new_tokens=5, batch_size=4)
    used, processors = calls.pop()
    assert (used.do_sample, used.num_beams, used.repetition_penalty) == (False, 1, 1.0)
    assert {type(p) for p in processors} == {lp.SuppressTokensLogitsProcessor}
    test, batch = _batch(cfg, tokenizer, images, model, shards_dir, "test", with_targets=False)
    ids = batch["input_ids"]
    with torch.no_grad():
        for _ in range(5):
            step = model(**{**batch, "input_ids": ids, "attention_mask": torch.ones_like(ids)}).logits[:, -1]
            step[:, model.point_token_ids] = -float("inf")
            ids = torch.cat([ids, step.argmax(-1, keepdim=True)], dim=1)
    greedy = tokenizer.decode(ids[0, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert next(r["output"] for r in lines if r["instance_id"] == test[0].instance_id) == greedy


def test_saved_checkpoints_carry_token_ids_only(chat_checkpoint, shards_dir, tmp_path):
    cfg = _config(chat_checkpoint)
    cfg.sft.batch_size, cfg.sft.per_device_batch_size, cfg.sft.max_steps = 1, 1, 1
    tokenizer, images, model = load(cfg, None)
    run_sft(model, tokenizer, images, shards_dir, cfg.sft, str(tmp_path / "sft"))
    saved = json.loads((tmp_path / "sft" / "checkpoint-1" / "generation_config.json").read_text())
    saved.pop("transformers_version", None)
    im_end = tokenizer.convert_tokens_to_ids(STOP_TOKEN)
    assert saved == {"eos_token_id": im_end, "pad_token_id": tokenizer.pad_token_id}


def test_sft_targets_end_with_the_token_generation_stops_on(shards_dir, tmp_path):
    """A tokenizer whose eos_token (<|endoftext|>, as base Qwen models) is not the end of a chat turn."""
    folder = write_tiny_qwen_checkpoint(str(tmp_path / "base-qwen"), eos_token="<|endoftext|>")
    cfg = _config(folder)
    tokenizer, images, model = load(cfg, None)
    im_end = tokenizer.convert_tokens_to_ids(STOP_TOKEN)
    assert tokenizer.eos_token == "<|endoftext|>" and tokenizer.eos_token_id != im_end
    examples, batch = _batch(cfg, tokenizer, images, model, shards_dir, n=2, with_targets=True)
    for labels, example in zip(batch["labels"], examples, strict=True):
        answer = labels[labels != -100].tolist()
        assert answer[-1] == im_end and tokenizer.eos_token_id not in answer
        assert tokenizer.decode(answer[:-1]) == example.target
    assert greedy_config(tokenizer, 4).eos_token_id == im_end == model.lm.generation_config.eos_token_id
