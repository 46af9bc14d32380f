"""routed_grpo_loss: vanilla GRPO as a special case, independent gradients, locality of field credit, and
equality with TRL 1.16's GRPOTrainer._compute_loss for each loss_type."""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import pytest
import torch

import pointvl.grca
from pointvl.grca import clip_fraction, group_advantages, pad_token_advantages, route, routed_grpo_loss


def _batch(seed: int = 0, b: int = 4, t: int = 7) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    logp = (-torch.rand(b, t, generator=g, dtype=torch.float64) * 3).requires_grad_()
    old = logp.detach() + 0.3 * torch.randn(b, t, generator=g, dtype=torch.float64)
    adv = torch.randn(b, t, generator=g, dtype=torch.float64)
    lengths = torch.tensor([t, t - 2, 3, 1][:b])
    mask = (torch.arange(t)[None] < lengths[:, None]).to(torch.float64)
    return logp, old, adv, mask


def _reference_grad(logp, old, adv, mask, eps, beta=0.0, ref=None) -> np.ndarray:
    """d loss / d logp written out token by token (no autograd)."""
    lp, od, a, m = (x.detach().numpy() for x in (logp, old, adv, mask))
    grad = np.zeros_like(lp)
    b = lp.shape[0]
    for i in range(b):
        n = max(m[i].sum(), 1.0)
        for t in range(lp.shape[1]):
            if not m[i, t]:
                continue
            rho = np.exp(lp[i, t] - od[i, t])
            clipped = min(max(rho, 1 - eps), 1 + eps)
            g = -rho * a[i, t] if rho * a[i, t] <= clipped * a[i, t] else 0.0  # clipped branch is constant
            if beta:
                g += beta * (1 - np.exp(ref[i, t] - lp[i, t]))
            grad[i, t] = g / n / b
    return grad


def test_ratio_one_constant_advantages_is_vanilla_grpo() -> None:
    logp, _, _, mask = _batch()
    seq_adv = torch.tensor([0.5, -1.0, 2.0, 0.0], dtype=torch.float64)
    tok_adv = seq_adv[:, None].expand_as(logp)
    loss = routed_grpo_loss(logp, logp.detach(), tok_adv, mask)
    assert loss.item() == pytest.approx(-seq_adv.mean().item())
    (grad,) = torch.autograd.grad(loss, logp)
    expected = -seq_adv[:, None] * mask / mask.sum(1, keepdim=True) / len(seq_adv)
    assert torch.allclose(grad, expected)
    loss_b = routed_grpo_loss(logp, logp.detach(), seq_adv[:, None], mask)  # (B, 1) broadcasts
    assert loss_b.item() == pytest.approx(loss.item())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gradient_matches_token_by_token_computation(seed: int) -> None:
    logp, old, adv, mask = _batch(seed)
    loss = routed_grpo_loss(logp, old, adv, mask, clip_eps=0.2)
    (grad,) = torch.autograd.grad(loss, logp)
    assert np.allclose(grad.numpy(), _reference_grad(logp, old, adv, mask, 0.2))
    ratio = torch.exp(logp - old)
    assert ((ratio - 1).abs() > 0.2).any(), "the batch must exercise the clipped branch"


def test_kl_term_value_and_gradient() -> None:
    logp, old, adv, mask = _batch(5)
    ref = logp.detach() + 0.2
    base = routed_grpo_loss(logp, old, adv, mask)
    loss = routed_grpo_loss(logp, old, adv, mask, beta=0.1, ref_logp=ref)
    diff = ref - logp.detach()
    kl = ((torch.exp(diff) - diff - 1) * mask).sum(1) / mask.sum(1)
    assert (loss - base).item() == pytest.approx(0.1 * kl.mean().item())
    (grad,) = torch.autograd.grad(loss, logp)
    assert np.allclose(grad.numpy(), _reference_grad(logp, old, adv, mask, 0.2, 0.1, ref.numpy()))


def test_gradcheck_away_from_kinks() -> None:
    logp, old, adv, mask = _batch(3)
    old = logp.detach() + 0.01  # ratios near 1: no clipping kink within the finite differences
    assert torch.autograd.gradcheck(lambda lp: routed_grpo_loss(lp, old, adv, mask), (logp,))


def test_padding_and_empty_sequences() -> None:
    logp, old, adv, mask = _batch()
    mask[3] = 0
    loss = routed_grpo_loss(logp, old, adv, mask)
    padded = logp.detach().clone()
    padded[mask == 0] = 123.0  # garbage under the mask changes nothing
    assert routed_grpo_loss(padded, old, adv, mask).item() == pytest.approx(loss.item())
    three = routed_grpo_loss(logp[:3], old[:3], adv[:3], mask[:3])
    assert loss.item() == pytest.approx(three.item() * 3 / 4)  # an empty sequence counts as 0 in the mean


def test_changing_one_field_reward_moves_only_its_tokens_and_background() -> None:
    rng = np.random.default_rng(0)
    g, fields = 8, rng.uniform(size=(8, 4))
    rpc = rng.uniform(size=g)
    ids = [np.array([-1, 0, 0, 0, -1, 1, 1, -1, 2, 2, 2, 2, -1, 3, 3, 3, -1])] * g
    changed = fields.copy()
    changed[2, 2] = 1.0 - changed[2, 2]  # kpts2d reward of output 2 only
    logp = (-torch.rand(g, 17, dtype=torch.float64)).requires_grad_()
    old = logp.detach() + 0.05 * torch.randn(g, 17, dtype=torch.float64)
    mask = torch.ones(g, 17, dtype=torch.float64)

    def grad_for(r: np.ndarray, mode: str) -> torch.Tensor:
        a, bg = group_advantages(r, rpc, rpc, mode, 0.15, 1e-4, "field_mean")
        adv = pad_token_advantages([route(ids[i], a[i], bg[i]) for i in range(g)], 17).double()
        return torch.autograd.grad(routed_grpo_loss(logp, old, adv, mask), logp)[0]

    touched = torch.from_numpy(np.isin(ids[0], [2, -1]))
    for mode in ("grca", "grca_rpc"):
        moved = (grad_for(changed, mode) - grad_for(fields, mode)).abs() > 1e-12
        assert not moved[:, ~touched].any() and moved[:, touched].any()
    moved = (grad_for(changed, "broadcast") - grad_for(fields, "broadcast")).abs() > 1e-12
    assert moved[:, ~touched].any()  # the broadcast reward leaks into every field


def test_argument_validation() -> None:
    logp, old, adv, mask = _batch()
    with pytest.raises(ValueError, match="clip_eps"):
        routed_grpo_loss(logp, old, adv, mask, clip_eps=0.0)
    with pytest.raises(ValueError, match="ref_logp"):
        routed_grpo_loss(logp, old, adv, mask, beta=0.1)
    with pytest.raises(ValueError, match="shape"):
        routed_grpo_loss(logp, old[:, :3], adv, mask)
    with pytest.raises(ValueError, match="length"):
        pad_token_advantages([np.zeros(5)], 4)


# --- equality with TRL 1.16's GRPOTrainer._compute_loss -------------------------------------------------


def _trl_trainer(loss_type: str, beta: float, grad_accum: int, max_completion_length: int, tmp_path) -> object:
    """A real GRPOTrainer without its __init__: a real GRPOConfig and the attributes ``_compute_loss`` reads,
    set as ``GRPOTrainer.__init__`` sets them from the config (no model, no data set)."""
    from accelerate import Accelerator
    from trl import GRPOConfig, GRPOTrainer

    args = GRPOConfig(output_dir=str(tmp_path), loss_type=loss_type, beta=beta, epsilon=0.2,
                      max_completion_length=max_completion_length, gradient_accumulation_steps=grad_accum,
                      per_device_train_batch_size=4, num_generations=4, use_bias_correction_kl=False,
                      use_cpu=True, report_to="none")
    trainer = object.__new__(GRPOTrainer)
    trainer.args = args
    trainer.accelerator = Accelerator(cpu=True)
    trainer.model = torch.nn.Linear(1, 1)  # only its .training flag is read (True: the train-mode normaliser)
    for name in ("loss_type", "beta", "max_completion_length", "use_vllm", "vllm_importance_sampling_correction",
                 "importance_sampling_level", "off_policy_mask_threshold", "top_entropy_quantile"):
        setattr(trainer, name, getattr(args, name))
    trainer.epsilon_low, trainer.epsilon_high = args.epsilon, args.epsilon
    trainer.aux_loss_enabled, trainer._entropy_bonus_enabled = False, False
    trainer.current_gradient_accumulation_steps = grad_accum
    trainer._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
    return trainer


def _trl_loss(trainer, logp, old, adv, mask, ref, num_items_in_batch) -> torch.Tensor:
    """TRL's own code path on given log-probs: its log-prob helper returns ``logp`` instead of running a model."""
    b, t = logp.shape
    trainer._get_per_token_logps_and_entropies = lambda *a, **k: (logp, torch.zeros_like(logp), None)
    inputs = {"prompt_ids": torch.zeros(b, 2, dtype=torch.long), "prompt_mask": torch.ones(b, 2, dtype=torch.long),
              "completion_ids": torch.zeros(b, t, dtype=torch.long), "completion_mask": mask,
              "advantages": adv, "old_per_token_logps": old, "ref_per_token_logps": ref,
              "num_items_in_batch": torch.tensor(num_items_in_batch, dtype=logp.dtype)}
    return trainer._compute_loss(None, inputs)


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo"])
@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("grad_accum", [1, 2])
def test_broadcast_loss_equals_trl(loss_type: str, beta: float, grad_accum: int, tmp_path) -> None:
    """Broadcast advantages (one per sequence): each micro-batch's loss equals TRL's to 1e-6, and so does
    its gradient. With ``grad_accum`` micro-batches per step, TRL divides grpo/dr_grpo by the accumulation
    steps itself and dapo by the step's tokens; our loop leaves the division by the accumulation steps to
    accelerate's backward and passes ``num_items`` = the step's tokens / the micro-batches (``grpo.py``)."""
    b, t, max_len = 8, 9, 12
    g = torch.Generator().manual_seed(7)
    logp0 = -torch.rand(b, t, generator=g, dtype=torch.float64) * 3
    old = logp0 + 0.3 * torch.randn(b, t, generator=g, dtype=torch.float64)  # ratios outside [0.8, 1.2] too
    ref = logp0 + 0.2 * torch.randn(b, t, generator=g, dtype=torch.float64)
    adv = torch.randn(b, generator=g, dtype=torch.float64)
    lengths = torch.tensor([9, 7, 3, 1, 0, 9, 5, 2])  # an empty completion included
    mask = (torch.arange(t)[None] < lengths[:, None]).long()
    trainer = _trl_trainer(loss_type, beta, grad_accum, max_len, tmp_path)
    step_tokens = float(mask.sum())
    size = b // grad_accum
    for k in range(grad_accum):
        rows = slice(k * size, (k + 1) * size)
        theirs_lp = logp0[rows].clone().requires_grad_()
        ours_lp = logp0[rows].clone().requires_grad_()
        theirs = _trl_loss(trainer, theirs_lp, old[rows], adv[rows], mask[rows], ref[rows], step_tokens)
        ours = routed_grpo_loss(ours_lp, old[rows], adv[rows, None], mask[rows], clip_eps=0.2, beta=beta,
                                ref_logp=ref[rows], loss_type=loss_type, max_completion_length=max_len,
                                num_items=step_tokens / grad_accum) / grad_accum
        assert abs(ours.item() - theirs.item()) < 1e-6
        (g_theirs,) = torch.autograd.grad(theirs, theirs_lp)
        (g_ours,) = torch.autograd.grad(ours, ours_lp)
        assert torch.allclose(g_ours, g_theirs, atol=1e-9)
    if grad_accum == 1:  # dapo's default num_items is the batch's tokens, as TRL's for one micro-batch
        plain = routed_grpo_loss(logp0, old, adv[:, None], mask, loss_type=loss_type, max_completion_length=max_len,
                                 beta=beta, ref_logp=ref)
        assert abs(plain.item() - _trl_loss(trainer, logp0, old, adv, mask, ref, step_tokens).item()) < 1e-6
    clipped = _trl_loss(trainer, logp0, old, adv, mask, ref, step_tokens)  # fills TRL's clip metrics
    assert clipped is not None
    assert trainer._metrics["train"]["clip_ratio/region_mean"][-1] == pytest.approx(
        clip_fraction(logp0, old, adv[:, None], mask, 0.2), abs=1e-6)  # TRL counts in float32


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo"])
def test_routed_equals_broadcast_when_fields_share_an_advantage(loss_type: str, tmp_path) -> None:
    rng = np.random.default_rng(3)
    b, t = 6, 11
    logp, old, _, mask = _batch(4, b=4, t=t)
    logp, old = torch.cat([logp.detach(), logp.detach()[:2]]), torch.cat([old, old[:2]])
    mask = torch.cat([mask, mask[:2]])
    seq = rng.normal(size=b)
    ids = [rng.integers(-1, 4, size=t) for _ in range(b)]  # any routing of tokens to fields
    routed = torch.from_numpy(np.stack([route(ids[i], [seq[i]] * 4, seq[i]) for i in range(b)]))
    broadcast = torch.from_numpy(seq)
    kw = {"loss_type": loss_type, "max_completion_length": 16}
    ours = routed_grpo_loss(logp, old, routed, mask, **kw)
    assert ours.item() == pytest.approx(routed_grpo_loss(logp, old, broadcast[:, None], mask, **kw).item(), abs=1e-12)
    trainer = _trl_trainer(loss_type, 0.0, 1, 16, tmp_path)
    theirs = _trl_loss(trainer, logp, old, broadcast, mask.long(), None, float(mask.sum()))
    assert abs(ours.item() - theirs.item()) < 1e-6


def test_loss_type_validation() -> None:
    logp, old, adv, mask = _batch()
    with pytest.raises(ValueError, match="loss_type"):
        routed_grpo_loss(logp, old, adv, mask, loss_type="bnpo")
    with pytest.raises(ValueError, match="max_completion_length"):
        routed_grpo_loss(logp, old, adv, mask, loss_type="dr_grpo")
    with pytest.raises(ValueError, match="num_items"):
        routed_grpo_loss(logp, old, adv, mask, loss_type="dapo", num_items=0)


def test_config_names_the_loss_types_of_the_loss() -> None:
    from pointvl.train.train_config import LOSS_TYPES, GRPOTrainConfig

    assert LOSS_TYPES == pointvl.grca.LOSS_TYPES
    with pytest.raises(ValueError, match="loss_type"):
        GRPOTrainConfig(loss_type="bnpo")
