"""Point-BERT's point-cloud transformer (Yu et al., 2022), as PointLLM uses it, written in torch.

The encoder turns a point cloud (B, N, 3) or (B, N, 6) (xyz, or xyz + rgb in [0, 1]) into
``num_group + 1`` tokens of width ``trans_dim``:

0. **Input** (:meth:`PointBERT.prepare`, the one place it happens): xyz centred on its mean and scaled
   so the farthest point is at distance 1 (PointLLM's ``pc_norm``: Point-BERT was trained on clouds in
   the unit sphere); colours pass through. A 6-channel encoder given xyz only gets the constant
   ``missing_color`` as every point's rgb; a 3-channel encoder given rgb uses the xyz only.
1. **Patches**: ``num_group`` centres by farthest point sampling, each with its ``group_size``
   nearest neighbours, xyz expressed relative to the centre (colours kept as they are).
2. **Mini-PointNet tokenizer** per patch: Conv1d ``point_dims``->128 (BN, ReLU) ->256, max-pool,
   concatenate the pooled feature to every point, Conv1d 512->512 (BN, ReLU) ->``encoder_dims``,
   max-pool; then a linear map to ``trans_dim``.
3. **Transformer**: a CLS token, a positional MLP (3->128->``trans_dim``) on the centres added before
   every block, ``depth`` pre-norm blocks (``num_heads`` heads, MLP ratio 4, qkv without bias), a final
   LayerNorm. Returns all tokens (PointLLM's ``use_max_pool: false``).

**Float32 always.** The encoder runs with autocast off, its FPS and kNN on float32 coordinates, and
every layer computes in float32 whatever dtype its weights are stored in (an engine that casts the
frozen encoder to bf16 costs the weights' rounding, not bf16 arithmetic); the tokens are cast back to
the input's dtype.

**Released weights** load without renaming inside the model (parameter names are upstream's):

- ``Point-BERT.pth`` (Point-BERT's pre-training, 3 channels): ``ckpt["base_model"]``, keys
  ``module.transformer_q.<name>``; the momentum encoder ``transformer_k``, the dVAE and the MoCo queue
  are not used, nor (as in upstream's fine-tuning loader) ``transformer_q.cls_head``; the
  pre-training heads ``mask_token`` and ``lm_head`` are the documented unused keys
  (:data:`UNUSED_KEYS`).
- PointLLM's ``point_bert_v1.2.pt`` (ULIP-2's Point-BERT, 6 channels: xyz + rgb, so
  ``point_dims=6``): ``ckpt["state_dict"]``, keys ``module.point_encoder.<name>``; keys outside that
  prefix (ULIP's projections) are not used.

Differences from the original: FPS and kNN are plain torch (no ``pointnet2_ops``/``knn_cuda``; FPS keeps
the kernel's rules, :func:`farthest_point_sample`), and dropout/drop-path are absent (the encoder is
frozen).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

logger = logging.getLogger(__name__)


UNUSED_KEYS = {
    "base_model": ("mask_token", "lm_head.weight", "lm_head.bias"),  # Point-BERT.pth's pre-training heads
    "state_dict": (),  # point_bert_v1.2.pt: every key under module.point_encoder. is used
}
"""Keys under the encoder's prefix that a released checkpoint holds and the encoder does not use, by layout."""

_FIRST_CONV = "encoder.first_conv.0.weight"


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
        point_dims: input channels per point the first layer takes: 3 (xyz; ``Point-BERT.pth``) or 6
            (xyz + rgb; PointLLM's ``point_bert_v1.2.pt``). It must match the checkpoint (preflight checks).
        missing_color: with ``point_dims=6``, the grey level in [0, 1] given as rgb to every point of a cloud
            without colours (0.0, black: what PointLLM's demo gives a cloud without colours). Records carry
            colours in an optional ``colors`` column (N x 3, in [0, 1]); the benchmark's records have none.
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
    missing_color: float = 0.0
    checkpoint: str | None = None
    random_init: bool = False

    def __post_init__(self) -> None:
        if self.trans_dim % self.num_heads:
            raise ValueError(f"trans_dim ({self.trans_dim}) must be divisible by num_heads ({self.num_heads})")
        if self.point_dims not in (3, 6):
            raise ValueError(f"point_dims must be 3 (xyz) or 6 (xyz + rgb), got {self.point_dims}")
        if min(self.depth, self.num_group, self.group_size, self.encoder_dims) < 1:
            raise ValueError("depth, num_group, group_size and encoder_dims must all be >= 1")
        if not 0.0 <= self.missing_color <= 1.0:
            raise ValueError(f"missing_color is an rgb grey level in [0, 1], got {self.missing_color}")


def pc_norm(xyz: torch.Tensor) -> torch.Tensor:
    """(B, N, 3) clouds centred on their mean and scaled so the farthest point is at distance 1 (PointLLM)."""
    centred = xyz - xyz.mean(dim=1, keepdim=True)
    radius = centred.norm(dim=-1).amax(dim=1).clamp_min(torch.finfo(xyz.dtype).tiny)
    return centred / radius[:, None, None]


def farthest_point_sample(xyz: torch.Tensor, n: int) -> torch.Tensor:
    """Indices (B, n) of ``n`` farthest-point samples of ``xyz`` (B, N, 3), with ``pointnet2_ops``' rules (the
    kernel Point-BERT and PointLLM call): the first is point 0, and a point with ``|p|^2 <= 1e-3`` (on
    normalised clouds, a ball of radius 0.032 round the centroid) is never picked after it."""
    b, num, _ = xyz.shape
    idx = torch.zeros(b, n, dtype=torch.long, device=xyz.device)
    dist = torch.full((b, num), float("inf"), device=xyz.device, dtype=xyz.dtype)
    skipped = (xyz**2).sum(-1) <= 1e-3
    far = torch.zeros(b, dtype=torch.long, device=xyz.device)
    rows = torch.arange(b, device=xyz.device)
    for i in range(n):
        idx[:, i] = far
        d = ((xyz - xyz[rows, far][:, None]) ** 2).sum(-1)
        dist = torch.minimum(dist, d)
        far = dist.masked_fill(skipped, -1.0).argmax(-1)
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


# Layers that compute in float32 whatever their weights' storage dtype (the module docstring's "Float32 always");
# subclasses, so parameter names and state dicts are nn's.
class Linear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.float(), self.weight.float(), None if self.bias is None else self.bias.float())


class Conv1d(nn.Conv1d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv1d(x.float(), self.weight.float(), self.bias.float())  # kernel 1, stride 1, no padding


class LayerNorm(nn.LayerNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x.float(), self.normalized_shape, self.weight.float(), self.bias.float(), self.eps)


class BatchNorm1d(nn.BatchNorm1d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:  # the frozen encoder is in eval mode: running statistics
        return F.batch_norm(x.float(), self.running_mean.float(), self.running_var.float(), self.weight.float(),
                            self.bias.float(), self.training, self.momentum, self.eps)


class Encoder(nn.Module):
    """The mini-PointNet patch tokenizer (names as in Point-BERT's ``Encoder``)."""

    def __init__(self, encoder_channel: int, point_input_dims: int = 3) -> None:
        super().__init__()
        self.encoder_channel = encoder_channel
        self.first_conv = nn.Sequential(
            Conv1d(point_input_dims, 128, 1), BatchNorm1d(128), nn.ReLU(inplace=True), Conv1d(128, 256, 1)
        )
        self.second_conv = nn.Sequential(
            Conv1d(512, 512, 1), BatchNorm1d(512), nn.ReLU(inplace=True), Conv1d(512, encoder_channel, 1)
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
        self.fc1, self.act, self.fc2 = Linear(dim, hidden), nn.GELU(), Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = Linear(dim, dim * 3, bias=False)
        self.proj = Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.norm1, self.attn = LayerNorm(dim), Attention(dim, num_heads)
        self.norm2, self.mlp = LayerNorm(dim), Mlp(dim, 4 * dim)

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
    """Point-BERT's ``PointTransformer`` without a head: (B, N, 3 | 6) -> (B, num_group + 1, trans_dim)."""

    def __init__(self, config: PointBertConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = Encoder(config.encoder_dims, config.point_dims)
        self.reduce_dim = Linear(config.encoder_dims, config.trans_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.trans_dim))
        self.cls_pos = nn.Parameter(torch.randn(1, 1, config.trans_dim))
        self.pos_embed = nn.Sequential(Linear(3, 128), nn.GELU(), Linear(128, config.trans_dim))
        self.blocks = TransformerEncoder(config.trans_dim, config.depth, config.num_heads)
        self.norm = LayerNorm(config.trans_dim)

    @property
    def num_tokens(self) -> int:
        return self.config.num_group + 1

    def prepare(self, points: torch.Tensor) -> torch.Tensor:
        """Float32 (B, N, point_dims) input of the network: normalised xyz (``pc_norm``), then rgb as the
        module docstring's step 0 says."""
        channels = points.shape[-1]
        if channels not in (3, 6):
            raise ValueError(f"Point-BERT takes (B, N, 3) xyz or (B, N, 6) xyz + rgb clouds, got {channels} channels")
        points = points.float()
        xyz = pc_norm(points[..., :3])
        if self.config.point_dims == 3:
            return xyz
        rgb = points[..., 3:] if channels == 6 else torch.full_like(xyz, self.config.missing_color)
        return torch.cat([xyz, rgb], dim=-1)

    def forward(self, points: torch.Tensor) -> torch.Tensor:
        """Tokens (B, num_group + 1, trans_dim) in the dtype of ``points``, computed in float32."""
        with torch.autocast(points.device.type, enabled=False):
            patches, center = group_points(self.prepare(points), self.config.num_group, self.config.group_size)
            tokens = self.reduce_dim(self.encoder(patches))
            b = tokens.shape[0]
            x = torch.cat([self.cls_token.float().expand(b, -1, -1), tokens], dim=1)
            pos = torch.cat([self.cls_pos.float().expand(b, -1, -1), self.pos_embed(center)], dim=1)
            return self.norm(self.blocks(x, pos)).to(points.dtype)

    def load_checkpoint(self, path: str) -> list[str]:
        """Load ``Point-BERT.pth`` or PointLLM's ``point_bert_v1.2.pt`` (module docstring); returns the unused
        keys under the encoder's prefix. ValueError (one line, naming the fix) when the checkpoint does not fit."""
        layout, state = read_checkpoint(path)
        check_point_dims(path, state, self.config.point_dims)
        result = self.load_state_dict(state, strict=False)
        if result.missing_keys:
            raise ValueError(
                f"{path} lacks {len(result.missing_keys)} Point-BERT weights (e.g. {result.missing_keys[:3]}); "
                "check model.point_bert sizes (depth, trans_dim, ...) against the checkpoint's config"
            )
        unexpected = sorted(result.unexpected_keys)
        undocumented = sorted(set(unexpected) - set(UNUSED_KEYS[layout]))
        if undocumented:
            logger.warning("%s: %d keys the encoder does not use: %s", path, len(undocumented), undocumented[:5])
        logger.info("loaded Point-BERT weights from %s (%s layout, %d channels)", path, layout,
                    self.config.point_dims)
        return unexpected


def read_checkpoint(path: str) -> tuple[str, dict[str, torch.Tensor]]:
    """(layout, the encoder's state dict under its own names) of a released checkpoint file."""
    # a released training checkpoint (pickled optimizer state and configs beside the weights): trusted input
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    if isinstance(ckpt, dict) and "base_model" in ckpt:  # Point-BERT.pth
        raw = {k.removeprefix("module."): v for k, v in ckpt["base_model"].items()}
        state = {k.removeprefix("transformer_q."): v for k, v in raw.items()
                 if k.startswith("transformer_q.") and not k.startswith("transformer_q.cls_head")}
        return "base_model", state
    if isinstance(ckpt, dict) and "state_dict" in ckpt:  # PointLLM's point_bert_v1.2.pt
        prefix = "module.point_encoder."
        return "state_dict", {k.removeprefix(prefix): v for k, v in ckpt["state_dict"].items()
                              if k.startswith(prefix)}
    raise ValueError(f"{path} is not a released Point-BERT checkpoint: expected a 'base_model' (Point-BERT.pth) "
                     "or 'state_dict' (PointLLM's point_bert_v1.2.pt) entry")


def check_point_dims(path: str, state: dict[str, torch.Tensor], point_dims: int) -> None:
    """ValueError (one line, naming the fix) unless the checkpoint's first layer takes ``point_dims`` channels."""
    if _FIRST_CONV not in state:
        raise ValueError(f"{path} holds no Point-BERT encoder weights ({_FIRST_CONV} is missing)")
    channels = state[_FIRST_CONV].shape[1]
    if channels != point_dims:
        kind = "xyz + rgb, as PointLLM's point_bert_v1.2.pt" if channels == 6 else "xyz, as Point-BERT.pth"
        raise ValueError(f"{path} takes {channels} channels per point ({kind}): set "
                         f"model.point_bert.point_dims={channels} (it is {point_dims})")

