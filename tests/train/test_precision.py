"""Mixed precision: float32 master weights and optimizer state, bf16 compute, updates that do not round away."""

import io

import torch

from pointvl.core import io as pio
from pointvl.train.pipeline import load
from pointvl.train.sft import run_sft
from pointvl.train.train_config import preset_config


def test_bf16_mode_keeps_fp32_master_weights_and_every_tensor_moves(short_shards_dir, tmp_path):
    cfg = preset_config("tiny", "sft", {"model.dtype": "bfloat16", "sft": {
        "batch_size": 1, "per_device_batch_size": 1, "max_steps": 1, "learning_rate": 1e-6, "schedule": "constant"}})
    tokenizer, images, model = load(cfg, None)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert {p.dtype for p in trainable.values()} == {torch.float32}
    assert model.lm.model.visual.patch_embed.proj.weight.dtype == torch.bfloat16  # frozen: stored in bf16
    before = {n: p.detach().clone() for n, p in trainable.items()}

    history = run_sft(model, tokenizer, images, short_shards_dir, cfg.sft, str(tmp_path / "sft"))

    assert history[0]["learning_rate"] == 1e-6
    unchanged = [n for n, p in trainable.items() if torch.equal(p, before[n])]
    assert not unchanged, unchanged
    # the same update on bf16 parameters would mostly round away (the bug this guards against)
    w = "lm.model.language_model.layers.0.mlp.up_proj.weight"
    in_bf16 = (before[w] + (trainable[w].detach() - before[w])).bfloat16()
    assert (in_bf16 == before[w].bfloat16()).float().mean() > 0.5
    # compute ran in bf16; the optimizer state is float32 too
    optim = torch.load(io.BytesIO(pio.read_bytes(str(tmp_path / "sft" / "checkpoint-1" / "optimizer.pt"))))
    assert {s["exp_avg"].dtype for s in optim["state"].values()} == {torch.float32}
    batch = _one_batch(cfg, tokenizer, images, model, short_shards_dir)
    assert model(**batch).logits.dtype == torch.bfloat16


def _one_batch(cfg, tokenizer, images, model, shards):
    from pointvl.train.data import Collator, ShardExamples

    examples = list(ShardExamples(shards, "train", cfg.model.num_points, cfg.model.quant, shuffle=False))
    return Collator(tokenizer, images, model.num_point_tokens, with_targets=True)(examples[:1])


def test_point_bert_weights_load_when_given(tmp_path):
    """A PointLLM-layout checkpoint (``state_dict`` with ``module.point_encoder.``) reaches the encoder."""
    from pointvl.train.point_bert import PointBERT

    cfg = preset_config("tiny", "sft", None)
    torch.manual_seed(1)
    released = PointBERT(cfg.model.point_bert)
    path = tmp_path / "point_bert_v1.2.pt"
    torch.save({"state_dict": {f"module.point_encoder.{k}": v for k, v in released.state_dict().items()}}, path)
    _, _, model = load(preset_config("tiny", "sft", {"model.point_bert.checkpoint": str(path)}), None)
    for name, tensor in released.state_dict().items():
        assert torch.equal(model.point_encoder.state_dict()[name], tensor), name
