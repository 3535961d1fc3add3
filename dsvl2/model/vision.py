"""SigLIP-SO400M vision tower as DeepSeek-VL2 runs it (official ``siglip_vit.py`` over timm's ViT).

Patch embedding without padding (384 = 27*14 + 6: the last 6 pixel rows/columns are ignored), a
learned position table, pre-norm blocks with a fused ``qkv``, tanh-GELU MLP, and the final LayerNorm.
No class token and no pooling head: the ``attn_pool`` weights of the checkpoint are never executed
(spec §2). Attention uses ``scaled_dot_product_attention`` on ``(B, H, T, D)`` views, which matches the
golden outputs bit-exactly on CPU where a hand-written softmax does not (spec §2.3).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import VisionConfig
from ..errors import InputError
from . import cpu_kernels
from .layers import linear
from .plan import EXACT, Plan


class PatchEmbed(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.proj = nn.Conv2d(3, cfg.width, kernel_size=cfg.patch_size, stride=cfg.patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x)  # (N, C, g, g)
        return x.flatten(2).transpose(1, 2)  # (N, g*g, C), row-major patches


class Attention(nn.Module):
    plan: Plan = EXACT  # set per model by plan.apply

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.heads = cfg.heads
        self.qkv = nn.Linear(cfg.width, 3 * cfg.width)
        self.proj = nn.Linear(cfg.width, cfg.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, c = x.shape
        qkv = linear(x, self.qkv, self.plan).reshape(n, t, 3, self.heads, c // self.heads)  # (N, T, 3, H, D)
        q, k, v = qkv.unbind(2)  # each (N, T, H, D)
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))  # (N, H, T, D)
        return linear(o.transpose(1, 2).reshape(n, t, c), self.proj, self.plan)


class Mlp(nn.Module):
    plan: Plan = EXACT  # set per model by plan.apply

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.width, cfg.mlp_dim)
        self.fc2 = nn.Linear(cfg.mlp_dim, cfg.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = linear(x, self.fc1, self.plan)
        g = cpu_kernels.gelu_tanh(h, self.plan.kernels) if self.plan.kernels else None  # bf16 CPU inference
        return linear(F.gelu(h, approximate="tanh") if g is None else g, self.fc2, self.plan)


class Block(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.width, eps=1e-6)
        self.attn = Attention(cfg)
        self.norm2 = nn.LayerNorm(cfg.width, eps=1e-6)
        self.mlp = Mlp(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTower(nn.Module):
    """tiles (N, 3, S, S) -> features (N, g*g, width), g = S // patch_size."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg)
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.num_patches, cfg.width))
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))
        self.norm = nn.LayerNorm(cfg.width, eps=1e-6)
        self.gradient_checkpointing = False

    def forward(self, tiles: torch.Tensor, chunk_size: int | None = None) -> torch.Tensor:
        """All tiles go through as one batch unless ``chunk_size`` bounds the tiles per call."""
        size = self.cfg.image_size
        if tiles.dim() != 4 or tuple(tiles.shape[1:]) != (3, size, size):
            raise InputError(f"vision tower expects tiles of shape (N, 3, {size}, {size}), got {tuple(tiles.shape)}")
        if chunk_size is not None and tiles.shape[0] > chunk_size:
            return torch.cat([self._run(t) for t in tiles.split(chunk_size)], dim=0)
        return self._run(tiles)

    def _run(self, tiles: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(tiles) + self.pos_embed
        for block in self.blocks:
            if self.gradient_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return self.norm(x)
