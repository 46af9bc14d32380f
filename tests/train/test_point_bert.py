"""Point-BERT as released: both checkpoint layouts load whole and compute what upstream's code computes;
clouds are normalised once; the encoder runs in float32 whatever the engine or autocast does."""

import numpy as np
import pytest
import torch

from pointvl.core.errors import InputError
from pointvl.train.data import record_cloud
from pointvl.train.point_bert import UNUSED_KEYS, PointBERT, PointBertConfig, farthest_point_sample, pc_norm
from pointvl.train.train_config import preflight, preset_config

TINY = dict(trans_dim=32, depth=2, num_heads=2, num_group=16, group_size=8, encoder_dims=64)


def released_weights(point_dims: int, seed: int) -> dict[str, torch.Tensor]:
    """An encoder state dict under upstream's names, random everywhere (BatchNorm statistics included)."""
    g = torch.Generator().manual_seed(seed)
    state = PointBERT(PointBertConfig(**TINY, point_dims=point_dims)).state_dict()
    out = {}
    for k, v in state.items():
        if k.endswith("num_batches_tracked"):
            out[k] = torch.tensor(100)
        elif k.endswith("running_var"):
            out[k] = torch.rand(v.shape, generator=g) + 0.5
        else:
            out[k] = torch.randn(v.shape, generator=g) * 0.2
    return out


def save_point_bert_pth(path, weights: dict[str, torch.Tensor]) -> None:
    """Point-BERT.pth's layout: the pre-training model (transformer_q/k, dVAE, queue) under ``base_model``."""
    dim = TINY["trans_dim"]
    q = {**weights, "mask_token": torch.randn(1, 1, dim), "lm_head.weight": torch.randn(8192, dim),
         "lm_head.bias": torch.randn(8192), "cls_head.0.weight": torch.randn(256, dim),
         "cls_head.0.bias": torch.randn(256), "cls_head.2.weight": torch.randn(256, 256),
         "cls_head.2.bias": torch.randn(256)}
    base = {f"module.transformer_q.{k}": v for k, v in q.items()}
    base.update({f"module.transformer_k.{k}": torch.randn_like(v.float()) for k, v in q.items()})  # not the encoder
    base.update({"module.dvae.encoder.first_conv.0.weight": torch.randn(128, 3, 1),
                 "module.dvae.codebook": torch.randn(8192, 256), "module.queue": torch.randn(256, 16384),
                 "module.queue_ptr": torch.zeros(1, dtype=torch.long)})
    torch.save({"base_model": base, "optimizer": {"state": {}}, "epoch": 300, "metrics": {"acc": 0.0}}, path)


def save_pointllm_pt(path, weights: dict[str, torch.Tensor]) -> None:
    """PointLLM's point_bert_v1.2.pt layout: ULIP-2's model under ``state_dict``, the encoder as point_encoder."""
    state = {f"module.point_encoder.{k}": v for k, v in weights.items()}
    state.update({"module.pc_projection": torch.randn(TINY["trans_dim"], 1280), "module.logit_scale": torch.ones(())})
    torch.save({"state_dict": state, "epoch": 10}, path)


def reference_forward(w: dict[str, torch.Tensor], cloud: torch.Tensor, point_dims: int) -> torch.Tensor:
    """Upstream's computation on the released names, written out (PointLLM's PointTransformer with
    ``use_max_pool: false``, its Group/Encoder, Block and Attention; pc_norm as its dataset applies it)."""
    f = torch.nn.functional

    def bn(x, p):
        return (x - w[f"{p}.running_mean"][:, None]) / torch.sqrt(w[f"{p}.running_var"][:, None] + 1e-5) \
            * w[f"{p}.weight"][:, None] + w[f"{p}.bias"][:, None]

    def conv(x, p):
        return torch.einsum("oc,bcn->bon", w[f"{p}.weight"][..., 0], x) + w[f"{p}.bias"][:, None]

    def lin(x, p, bias=True):
        return x @ w[f"{p}.weight"].T + (w[f"{p}.bias"] if bias else 0)

    def ln(x, p):
        return f.layer_norm(x, x.shape[-1:], w[f"{p}.weight"], w[f"{p}.bias"], 1e-5)

    xyz = cloud[..., :3]
    xyz = xyz - xyz.mean(1, keepdim=True)
    xyz = xyz / (xyz ** 2).sum(-1).sqrt().max(1).values[:, None, None]  # pc_norm
    feats = torch.cat([xyz, cloud[..., 3:]], -1)
    b, n, _ = xyz.shape
    g, s = TINY["num_group"], TINY["group_size"]
    centers = []
    for i in range(b):  # pointnet2_ops' furthest_point_sampling_kernel
        chosen, temp, kept = [0], torch.full((n,), 1e10), (xyz[i] ** 2).sum(-1) > 1e-3  # `if (mag <= 1e-3) continue;`
        for _ in range(g - 1):
            d = ((xyz[i] - xyz[i, chosen[-1]]) ** 2).sum(-1)
            temp = torch.where(kept, torch.minimum(d, temp), temp)
            chosen.append(int(torch.where(kept, temp, -1.0).argmax()))
        centers.append(xyz[i, chosen])
    center = torch.stack(centers)
    sq = -2 * center @ xyz.transpose(1, 2) + (center ** 2).sum(-1)[..., None] + (xyz ** 2).sum(-1)[:, None]
    idx = sq.topk(s, dim=-1, largest=False).indices  # knn_point
    hood = torch.stack([feats[i][idx[i]] for i in range(b)])  # B G S C
    hood = torch.cat([hood[..., :3] - center[:, :, None], hood[..., 3:]], -1)
    x = hood.reshape(b * g, s, point_dims).transpose(2, 1)
    x = conv(torch.relu(bn(conv(x, "encoder.first_conv.0"), "encoder.first_conv.1")), "encoder.first_conv.3")
    x = torch.cat([x.max(2, keepdim=True).values.expand(-1, -1, s), x], 1)
    x = conv(torch.relu(bn(conv(x, "encoder.second_conv.0"), "encoder.second_conv.1")), "encoder.second_conv.3")
    tokens = lin(x.max(2).values.reshape(b, g, -1), "reduce_dim")
    x = torch.cat([w["cls_token"].expand(b, -1, -1), tokens], 1)
    pos = torch.cat([w["cls_pos"].expand(b, -1, -1),
                     lin(f.gelu(lin(center, "pos_embed.0")), "pos_embed.2")], 1)
    heads = TINY["num_heads"]
    for k in range(TINY["depth"]):
        p = f"blocks.blocks.{k}"
        x = x + pos
        h = ln(x, f"{p}.norm1")
        qkv = lin(h, f"{p}.attn.qkv", bias=False).reshape(b, g + 1, 3, heads, -1).permute(2, 0, 3, 1, 4)
        attn = (qkv[0] @ qkv[1].transpose(-2, -1) * (qkv.shape[-1] ** -0.5)).softmax(-1)
        x = x + lin((attn @ qkv[2]).transpose(1, 2).reshape(b, g + 1, -1), f"{p}.attn.proj")
        x = x + lin(f.gelu(lin(ln(x, f"{p}.norm2"), f"{p}.mlp.fc1")), f"{p}.mlp.fc2")
    return ln(x, "norm")


def cloud(b=2, n=128, colors=False, seed=0) -> torch.Tensor:
    """Points on an ellipsoid's surface in the record's frame, and 4 points at its centroid (where a textbook
    FPS would put a centre and pointnet2_ops' never does)."""
    g = torch.Generator().manual_seed(seed)
    shell = torch.nn.functional.normalize(torch.randn(b, n - 4, 3, generator=g), dim=-1)
    offsets = torch.tensor([[1e-3, 0, 0], [-1e-3, 0, 0], [0, 1e-3, 0], [0, -1e-3, 0]]).expand(b, -1, -1)
    shell = torch.cat([shell, shell.mean(1, keepdim=True) + offsets], 1)
    xyz = shell * torch.tensor([0.6, 1.4, 0.3]) + torch.tensor([2.0, -1.0, 0.5])
    return torch.cat([xyz, torch.rand(b, n, 3, generator=g)], -1) if colors else xyz


def test_fps_follows_pointnet2s_kernel():
    xyz = pc_norm(cloud())
    centres = farthest_point_sample(xyz, TINY["num_group"])
    assert (centres[:, 0] == 0).all() and not (centres >= 124).any()  # the 4 points at the centroid: never
    dist, textbook = torch.full((124 + 4,), float("inf")), [0]
    for _ in range(TINY["num_group"] - 1):
        dist = torch.minimum(dist, ((xyz[0] - xyz[0, textbook[-1]]) ** 2).sum(-1))
        textbook.append(int(dist.argmax()))
    assert max(textbook) >= 124  # a textbook FPS would pick one: the rule matters on these clouds


@pytest.mark.parametrize("layout", ["Point-BERT.pth", "point_bert_v1.2.pt"])
def test_released_checkpoints_load_whole_and_compute_upstreams_output(layout, tmp_path):
    point_dims = 3 if layout == "Point-BERT.pth" else 6
    weights = released_weights(point_dims, seed=7)
    path = str(tmp_path / layout)
    (save_point_bert_pth if layout == "Point-BERT.pth" else save_pointllm_pt)(path, weights)

    encoder = PointBERT(PointBertConfig(**TINY, point_dims=point_dims))
    unused = encoder.load_checkpoint(path)
    assert unused == sorted(UNUSED_KEYS["base_model" if point_dims == 3 else "state_dict"])
    state = encoder.state_dict()
    assert state.keys() == weights.keys()  # every parameter and buffer filled, from the released names
    assert all(torch.equal(state[k], v) for k, v in weights.items())

    points = cloud(colors=point_dims == 6)
    with torch.no_grad():
        out = encoder.eval()(points)
    assert out.shape == (2, TINY["num_group"] + 1, TINY["trans_dim"]) and out.dtype == torch.float32
    assert torch.allclose(out, reference_forward(weights, points, point_dims), atol=1e-5)


def test_a_checkpoint_with_other_channels_is_refused_with_the_fix(tmp_path):
    path = str(tmp_path / "point_bert_v1.2.pt")
    save_pointllm_pt(path, released_weights(6, seed=1))
    with pytest.raises(ValueError, match=r"takes 6 channels .* set model.point_bert.point_dims=6 \(it is 3\)"):
        PointBERT(PointBertConfig(**TINY)).load_checkpoint(path)
    tiny = {f"model.point_bert.{k}": v for k, v in TINY.items()}
    with pytest.raises(InputError, match="point_dims=6"):  # before any stage: the preflight reads the channels
        preflight(preset_config("tiny", "sft", {**tiny, "model.point_bert.checkpoint": path}))
    preflight(preset_config("tiny", "sft", {**tiny, "model.point_bert.checkpoint": path,
                                            "model.point_bert.point_dims": 6}))
    # the paper preset takes what its recommendation names (point_bert_v1.2.pt: 6 channels)
    paper = preset_config("paper", "grca_rpc", {"model.architecture": "3b", **tiny,
                                                "model.point_bert.checkpoint": path})
    assert paper.model.point_bert.point_dims == 6
    preflight(paper)
    empty = tmp_path / "empty.pt"
    torch.save({"state_dict": {}}, empty)
    with pytest.raises(InputError, match="holds no Point-BERT encoder weights"):
        preflight(preset_config("tiny", "sft", {"model.point_bert.checkpoint": str(empty)}))


def test_clouds_are_normalised_once_to_the_unit_sphere():
    points = cloud()
    unit = pc_norm(points)
    assert torch.allclose(unit.mean(1), torch.zeros(2, 3), atol=1e-6)
    assert torch.allclose(unit.norm(dim=-1).amax(1), torch.ones(2))
    encoder = PointBERT(PointBertConfig(**TINY)).eval()
    with torch.no_grad():
        out = encoder(points)
        moved = encoder(points * 3.7 + torch.tensor([-5.0, 2.0, 9.0]))  # where the record's frame puts it
        assert torch.allclose(out, moved, atol=1e-5)
        assert torch.allclose(out, encoder(unit), atol=1e-5)  # idempotent: normalised input is unchanged
        assert not torch.allclose(out, encoder(points * torch.tensor([1.0, 2.0, 1.0])), atol=1e-3)


def test_colours_come_from_the_record_or_the_documented_constant():
    encoder = PointBERT(PointBertConfig(**TINY, point_dims=6, missing_color=0.5)).eval()
    xyz = cloud()
    with torch.no_grad():
        grey = encoder(torch.cat([xyz, torch.full_like(xyz, 0.5)], -1))
        assert torch.equal(encoder(xyz), grey)
        assert not torch.allclose(encoder(cloud(colors=True)), grey, atol=1e-3)
    assert PointBertConfig().missing_color == 0.0  # default: black, PointLLM's choice for clouds without colour
    record = {"instance_id": "a", "points": np.zeros((5, 3)).tolist()}
    assert record_cloud(record).shape == (5, 3)
    assert record_cloud({**record, "colors": np.full((5, 3), 0.25).tolist()}).shape == (5, 6)
    with pytest.raises(ValueError, match="4 colors for 5 points"):
        record_cloud({**record, "colors": np.zeros((4, 3)).tolist()})


def test_the_encoder_computes_in_float32_under_bf16_weights_and_autocast():
    torch.manual_seed(0)
    encoder = PointBERT(PointBertConfig(**TINY)).eval()
    points = cloud()
    rounded = PointBERT(PointBertConfig(**TINY)).eval()  # the same weights as a bf16 engine stores them
    rounded.load_state_dict({k: v.bfloat16().to(v.dtype) for k, v in encoder.state_dict().items()})
    with torch.no_grad():
        full = encoder(points)
        expected = rounded(points)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert torch.equal(encoder(points), full)  # autocast does not reach inside
            encoder.to(torch.bfloat16)  # an engine casting the frozen encoder
            assert encoder.cls_token.dtype == torch.bfloat16
            out = encoder(points)
            out_bf16 = encoder(points.bfloat16())
    assert out.dtype == torch.float32 and out_bf16.dtype == torch.bfloat16  # cast back to the input's dtype
    assert torch.allclose(out, expected, atol=1e-5)  # float32 arithmetic on the bf16-stored weights
    with torch.no_grad():  # bf16 clouds: float32 inside too, only the input and the output are rounded
        assert torch.equal(out_bf16, rounded(points.bfloat16().float()).bfloat16())


def test_the_policy_feeds_point_bert_float32_clouds_in_bf16_mode(short_shards_dir):
    """In the policy, under bf16 autocast, with the encoder's weights cast as an engine would: the encoder
    gets float32 clouds and gives what the float32 encoder gives (on the same stored weights)."""
    from pointvl.train.data import Collator, ShardExamples
    from pointvl.train.pipeline import load

    cfg = preset_config("tiny", "sft", {"model.dtype": "bfloat16"})
    tokenizer, images, model = load(cfg, None)
    examples = list(ShardExamples(short_shards_dir, "train", cfg.model.num_points, cfg.model.quant, shuffle=False))
    batch = Collator(tokenizer, images, model.num_point_tokens, with_targets=True)(examples[:1])
    reference = PointBERT(cfg.model.point_bert).eval()
    model.point_encoder.to(torch.bfloat16)
    reference.load_state_dict({k: v.float() for k, v in model.point_encoder.state_dict().items()})
    seen = []
    model.point_encoder.register_forward_hook(lambda m, args, out: seen.append((args[0], out)))
    with torch.no_grad():
        assert model(**batch).logits.dtype == torch.bfloat16  # the rest of the model computes in bf16
        points, out = seen[0]
        assert points.dtype == out.dtype == torch.float32
        assert torch.allclose(out, reference(batch["points"]), atol=1e-5)
