"""Point-BERT's point-cloud transformer (Yu et al., 2022), as PointLLM uses it, written in torch.

The encoder turns a point cloud (B, N, 3) into ``num_group + 1`` tokens of width ``trans_dim``:

1. **Patches**: ``num_group`` centres by farthest point sampling, each with its ``group_size``
   nearest neighbours, expressed relative to the centre.
2. **Mini-PointNet tokenizer** per patch: Conv1d 3->128 (BN, ReLU) ->256, max-pool, concatenate the
   pooled feature to every point, Conv1d 512->512 (BN, ReLU) ->``encoder_dims``, max-pool; then a
   linear map to ``trans_dim``.
3. **Transformer**: a CLS token, a positional MLP (3->128->``trans_dim``) on the centres added before
   every block, ``depth`` pre-norm blocks (``num_heads`` heads, MLP ratio 4, qkv without bias), a final
   LayerNorm. Returns all tokens (PointLLM's ``use_max_pool: false``).

Parameter names follow the released checkpoints so that both load without renaming inside the
model: ``Point-BERT.pth`` (``ckpt["base_model"]``, prefixes ``module.`` and ``transformer_q.``) and
PointLLM's ``point_bert_v1.2.pt`` (``ckpt["state_dict"]``, prefix ``module.point_encoder.``).
Differences from the original: FPS and kNN are plain torch (no ``pointnet2_ops``/``knn_cuda``), FPS
starts from point 0 deterministically, and dropout/drop-path are absent (the encoder is frozen).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

logger = logging.getLogger(__name__)


@dataclass
class PointBertConfig:
    """Point-BERT encoder sizes (defaults: PointLLM's ``PointTransformer_8192point_2layer.yaml``).

    Attributes:
        trans_dim: token width (384).
        depth: transformer blocks (12).
        num_heads: attention heads (6).
        num_group: patches per cloud, i.e. point tokens minus the CLS token (512; Point-BERT: 64).
        group_size: points per patch (32).
        encoder_dims: mini-PointNet output width (256).
        point_dims: input channels per point (3 = xyz; PointLLM's coloured variant uses 6).
        checkpoint: path to ``Point-BERT.pth`` or ``point_bert_v1.2.pt``.
        random_init: keep random weights when ``checkpoint`` is None; a training run refuses to start
            without a checkpoint unless this is set (a frozen random encoder is not the paper's model).
    """

    trans_dim: int = 384
    depth: int = 12
    num_heads: int = 6
    num_group: int = 512
    group_size: int = 32
    encoder_dims: int = 256
    point_dims: int = 3
    checkpoint: str | None = None
    random_init: bool = False

    def __post_init__(self) -> None:
        if self.trans_dim % self.num_heads:
            raise ValueError(f"trans_dim ({self.trans_dim}) must be divisible by num_heads ({self.num_heads})")
        if self.point_dims not in (3, 6):
            raise ValueError(f"point_dims must be 3 (xyz) or 6 (xyz + rgb), got {self.point_dims}")
        if min(self.depth, self.num_group, self.group_size, self.encoder_dims) < 1:
            raise ValueError("depth, num_group, group_size and encoder_dims must all be >= 1")


def farthest_point_sample(xyz: torch.Tensor, n: int) -> torch.Tensor:
    """Indices (B, n) of ``n`` farthest-point samples of ``xyz`` (B, N, 3), starting at point 0."""
    b, num, _ = xyz.shape
    idx = torch.zeros(b, n, dtype=torch.long, device=xyz.device)
    dist = torch.full((b, num), float("inf"), device=xyz.device, dtype=xyz.dtype)
    far = torch.zeros(b, dtype=torch.long, device=xyz.device)
    rows = torch.arange(b, device=xyz.device)
    for i in range(n):
        idx[:, i] = far
        d = ((xyz - xyz[rows, far][:, None]) ** 2).sum(-1)
        dist = torch.minimum(dist, d)
        far = dist.argmax(-1)
    return idx


def group_points(points: torch.Tensor, num_group: int, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Patches (B, G, S, C) relative to their centres, and the centres (B, G, 3); xyz = channels 0..2."""
    xyz = points[..., :3]
    rows = torch.arange(points.shape[0], device=points.device)[:, None]
    center = xyz[rows, farthest_point_sample(xyz, num_group)]  # B G 3
    knn = torch.cdist(center, xyz).topk(group_size, dim=-1, largest=False).indices  # B G S
    patches = points[rows[..., None], knn]  # B G S C
    patches = torch.cat([patches[..., :3] - center[:, :, None], patches[..., 3:]], dim=-1)
    return patches, center


class Encoder(nn.Module):
    """The mini-PointNet patch tokenizer (names as in Point-BERT's ``Encoder``)."""

    def __init__(self, encoder_channel: int, point_input_dims: int = 3) -> None:
        super().__init__()
        self.encoder_channel = encoder_channel
        self.first_conv = nn.Sequential(
            nn.Conv1d(point_input_dims, 128, 1), nn.BatchNorm1d(128), nn.ReLU(inplace=True), nn.Conv1d(128, 256, 1)
        )
        self.second_conv = nn.Sequential(
            nn.Conv1d(512, 512, 1), nn.BatchNorm1d(512), nn.ReLU(inplace=True), nn.Conv1d(512, encoder_channel, 1)
        )

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        b, g, s, c = patches.shape
        feat = self.first_conv(patches.reshape(b * g, s, c).transpose(2, 1))  # BG 256 S
        pooled = feat.max(dim=2, keepdim=True).values
        feat = self.second_conv(torch.cat([pooled.expand(-1, -1, s), feat], dim=1))
        return feat.max(dim=2).values.reshape(b, g, self.encoder_channel)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        out = nn.functional.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), Attention(dim, num_heads)
        self.norm2, self.mlp = nn.LayerNorm(dim), Mlp(dim, 4 * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TransformerEncoder(nn.Module):
    def __init__(self, dim: int, depth: int, num_heads: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([Block(dim, num_heads) for _ in range(depth)])

    def forward(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x + pos)
        return x


class PointBERT(nn.Module):
    """Point-BERT's ``PointTransformer`` without a head: (B, N, point_dims) -> (B, num_group + 1, trans_dim)."""

    def __init__(self, config: PointBertConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = Encoder(config.encoder_dims, config.point_dims)
        self.reduce_dim = nn.Linear(config.encoder_dims, config.trans_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.trans_dim))
        self.cls_pos = nn.Parameter(torch.randn(1, 1, config.trans_dim))
        self.pos_embed = nn.Sequential(nn.Linear(3, 128), nn.GELU(), nn.Linear(128, config.trans_dim))
        self.blocks = TransformerEncoder(config.trans_dim, config.depth, config.num_heads)
        self.norm = nn.LayerNorm(config.trans_dim)

    @property
    def num_tokens(self) -> int:
        return self.config.num_group + 1

    def forward(self, points: torch.Tensor) -> torch.Tensor:
        if points.shape[-1] != self.config.point_dims:
            raise ValueError(f"expected {self.config.point_dims} channels per point, got {points.shape[-1]}")
        patches, center = group_points(points, self.config.num_group, self.config.group_size)
        tokens = self.reduce_dim(self.encoder(patches))
        b = tokens.shape[0]
        x = torch.cat([self.cls_token.expand(b, -1, -1), tokens], dim=1)
        pos = torch.cat([self.cls_pos.expand(b, -1, -1), self.pos_embed(center)], dim=1)
        return self.norm(self.blocks(x, pos))

    def load_checkpoint(self, path: str) -> None:
        """Load ``Point-BERT.pth`` or PointLLM's ``point_bert_v1.2.pt``; raise if a weight is missing."""
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
        state = remap_checkpoint(ckpt)
        result = self.load_state_dict(state, strict=False)
        if result.missing_keys:
            raise ValueError(
                f"{path} lacks {len(result.missing_keys)} Point-BERT weights (e.g. {result.missing_keys[:3]}); "
                "check PointBertConfig sizes against the checkpoint's config"
            )
        logger.info("loaded Point-BERT weights from %s (%d unused keys)", path, len(result.unexpected_keys))


def remap_checkpoint(ckpt: dict) -> dict[str, torch.Tensor]:
    """The encoder's state dict from either released layout (see the module docstring)."""
    if "base_model" in ckpt:  # Point-BERT.pth
        raw = {k.removeprefix("module."): v for k, v in ckpt["base_model"].items()}
        return {
            k.removeprefix("transformer_q."): v
            for k, v in raw.items()
            if k.startswith("transformer_q.") and not k.startswith("transformer_q.cls_head")
        }
    if "state_dict" in ckpt:  # PointLLM point_bert_v1.2.pt
        prefix = "module.point_encoder."
        return {k.removeprefix(prefix): v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}
    raise ValueError("unknown Point-BERT checkpoint: expected a 'base_model' (Point-BERT.pth) or "
                     "'state_dict' (PointLLM point_bert_v1.2.pt) entry")
