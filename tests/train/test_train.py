"""The tiny policy end to end: point tokens reach the LM, SFT learns the format, GRPO updates weights."""

import dataclasses

import pytest
import torch

from pointvl.grca import parse_output
from pointvl.train.data import Collator, ShardExamples
from pointvl.train.generation import greedy_config
from pointvl.train.grpo import run_grpo
from pointvl.train.model import build_image_processor, build_model, build_tokenizer
from pointvl.train.sft import run_sft
from pointvl.train.train_config import SFTConfig, tiny_preset

CFG = tiny_preset()


def _policy():
    torch.manual_seed(0)
    tok = build_tokenizer(CFG.model)
    return tok, build_image_processor(CFG.model), build_model(CFG.model, tok)


def _valid_fields(model, tok, images, shards) -> int:
    """Valid fields in the greedy outputs for the test split (out of 6 per instance)."""
    examples = list(ShardExamples(shards, "test", CFG.model.num_points, CFG.model.quant, shuffle=False))
    batch = Collator(tok, images, model.num_point_tokens, with_targets=False)
    total = 0
    for e in examples:
        ids = model.generate(**batch([e]), generation_config=greedy_config(tok, 300))
        parsed = parse_output(tok.decode(ids[0], skip_special_tokens=True))
        total += sum(f.valid for f in parsed.values())
    return total


@pytest.fixture(scope="module")
def trained(short_shards_dir):
    tok, images, model = _policy()
    before = _valid_fields(model, tok, images, short_shards_dir)
    sft = SFTConfig(epochs=1000, batch_size=1, per_device_batch_size=1, learning_rate=3e-3, max_steps=150)
    history = run_sft(model, tok, images, short_shards_dir, sft)
    return tok, images, model, history, before


def test_point_tokens_reach_the_language_model(shards_dir):
    tok, images, model = _policy()
    examples = list(ShardExamples(shards_dir, "train", CFG.model.num_points, CFG.model.quant, shuffle=False))[:2]
    batch = Collator(tok, images, model.num_point_tokens, with_targets=True)(examples)
    out = model(**batch)
    out.loss.backward()
    for p in (model.cross_attn.q_proj_weight, model.cross_attn.k_proj_weight, model.projector.weight):
        assert p.grad is not None and p.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.point_encoder.parameters())  # frozen
    moved = dict(batch, points=batch["points"] * torch.tensor([1.0, 1.5, 1.0]))  # a shift or a scale: normalised away
    with torch.no_grad():
        assert not torch.allclose(model(**moved).logits, out.logits)


def test_sft_loss_falls_and_format_validity_rises(trained, short_shards_dir):
    tok, images, model, history, before = trained
    first, last = history[0]["loss"], sum(r["loss"] for r in history[-10:]) / 10
    assert last < 0.5 * first, (first, last)
    after = _valid_fields(model, tok, images, short_shards_dir)
    assert before == 0 and after > before, (before, after)


def test_grpo_step_changes_trainable_weights(trained, short_shards_dir):
    tok, images, model, _, _ = trained
    _, _, policy = _policy()
    policy.load_state_dict(model.state_dict())
    before = {n: p.detach().clone() for n, p in policy.named_parameters() if p.requires_grad}
    frozen = {n: p.detach().clone() for n, p in policy.point_encoder.named_parameters()}
    # temperature 0.7: the samples differ in a few digits, so the group's field rewards differ
    grpo = dataclasses.replace(CFG.grpo, mode="grca_rpc", max_steps=1, temperature=0.7, max_new_tokens=300)
    history = run_grpo(policy, tok, images, short_shards_dir, grpo)
    assert len(history) == 1 and history[0]["seconds_generate"] > 0
    changed = [n for n, p in policy.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert any(n.startswith("cross_attn") for n in changed) and any(n.startswith("lm.") for n in changed)
    assert all(torch.equal(p, frozen[n]) for n, p in policy.point_encoder.named_parameters())
    row = history[0]
    for f in ("bbox2d", "bbox3d", "kpts2d", "kpts3d", "rpc"):
        assert 0 <= row[f"zero_spread_{f}"] <= 1 and row[f"reward_{f}_std"] >= 0
    assert 0 <= row["truncated"] <= 1 and 0 <= row["unparsable"] <= 1
    assert row["clip_fraction"] == 0  # one optimizer step per rollout batch: the ratio is 1


def test_grpo_diagnostics_report_truncation(trained, short_shards_dir, caplog):
    """Completions cut at 5 tokens: every one truncated and unparsable, every field without spread, a warning
    (with loss_type dapo: the step's token count is reduced before the updates)."""
    tok, images, model, _, _ = trained
    _, _, policy = _policy()
    policy.load_state_dict(model.state_dict())
    grpo = dataclasses.replace(CFG.grpo, max_steps=1, max_new_tokens=5, loss_type="dapo")
    with caplog.at_level("WARNING", logger="pointvl.train.grpo"):
        row = run_grpo(policy, tok, images, short_shards_dir, grpo)[0]
    assert row["truncated"] == 1 and row["unparsable"] == 1
    assert all(row[f"zero_spread_{f}"] == 1 and row[f"reward_{f}_std"] == 0 for f in ("bbox2d", "kpts3d", "rpc"))
    assert row["loss"] == 0  # no spread, no advantage
    assert any("cut at max_new_tokens=5" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo"])
def test_grpo_update_moves_each_token_along_its_advantage(short_shards_dir, loss_type):
    """The plumbing of a GRPO step (completion log-probs, padded per-token advantages, mask, loss) points the
    right way: after one small SGD step, sum(A * delta log p) > 0 (to first order it is lr * |gradient|^2), and
    tokens given advantage +1 gain more log-probability than tokens given -1, within one completion (routed
    credit) and between completions; padding past a completion's end carries no credit. The direction holds
    for any weights: the untrained policy, so that this test does not wait for the module's SFT."""
    from pointvl.grca.loss import pad_token_advantages, routed_grpo_loss
    from pointvl.train.grpo import completion_logps

    tok, images, policy = _policy()
    example = next(iter(ShardExamples(short_shards_dir, "train", CFG.model.num_points, CFG.model.quant,
                                      shuffle=False)))
    inputs = Collator(tok, images, policy.num_point_tokens, with_targets=False)([example])
    # four completions: slices of the record's canonical answer (varied characters, as a policy would write)
    text = tok(example.target, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([text[i * 10: i * 10 + 40] for i in range(4)])
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[3, 20:] = False  # a shorter completion: its padding carries no credit
    half = ids.shape[1] // 2
    advantages = [[1.0] * half + [-1.0] * (ids.shape[1] - half), [-1.0] * ids.shape[1], [1.0] * ids.shape[1],
                  [1.0] * 20]
    adv = pad_token_advantages(advantages, ids.shape[1])
    before = completion_logps(policy, inputs, ids, mask, 256, 1.0).detach()
    logp = completion_logps(policy, inputs, ids, mask, 256, 1.0)
    loss = routed_grpo_loss(logp, logp.detach(), adv, mask, loss_type=loss_type, max_completion_length=40,
                            num_items=float(mask.sum()))
    optimizer = torch.optim.SGD([p for p in policy.parameters() if p.requires_grad], lr=0.01)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    with torch.no_grad():
        delta = completion_logps(policy, inputs, ids, mask, 256, 1.0) - before
    up, down = delta[(adv > 0) & mask], delta[(adv < 0) & mask]
    assert up.mean() > down.mean(), (up.mean(), down.mean())
    assert delta[0, :half].mean() > delta[0, half:].mean()  # routed within one completion
    assert delta[2].mean() > delta[1].mean()  # between completions
    assert (adv * delta)[mask].sum() > 0


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_trained_logps_are_those_generate_sampled_from(short_shards_dir, temperature):
    """GRPO's ratio must be of the distribution the rollouts came from: ``generate`` samples from the logits
    divided by the temperature (its ``TemperatureLogitsWarper``), so the trained log-probabilities divide them
    too (TRL 1.16 alike). Compared with ``generate``'s own processed scores of the sampled tokens."""
    from pointvl.train.generation import sampling_config
    from pointvl.train.grpo import completion_lengths, completion_logps

    tok, images, policy = _policy()
    policy.eval()
    example = next(iter(ShardExamples(short_shards_dir, "train", CFG.model.num_points, CFG.model.quant,
                                      shuffle=False)))
    inputs = Collator(tok, images, policy.num_point_tokens, with_targets=False)([example])
    sampling = sampling_config(tok, 24, 3, temperature, 1.0, 0)
    sampling.return_dict_in_generate, sampling.output_scores = True, True
    torch.manual_seed(0)
    out = policy.generate(**inputs, generation_config=sampling)
    ids = out.sequences
    mask = torch.arange(ids.shape[1])[None] < completion_lengths(ids, tok.convert_tokens_to_ids("<|im_end|>"))[:, None]
    sampled = torch.stack(out.scores, 1).log_softmax(-1).gather(-1, ids[..., None]).squeeze(-1)
    with torch.no_grad():
        trained = completion_logps(policy, inputs, ids, mask, 256, temperature)
        untempered = completion_logps(policy, inputs, ids, mask, 256, 1.0)
    assert torch.allclose(trained[mask], sampled[mask], atol=1e-4)
    if temperature != 1.0:
        assert not torch.allclose(untempered[mask], sampled[mask], atol=1e-2)
