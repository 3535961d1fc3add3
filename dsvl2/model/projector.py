"""``downsample_mlp_gelu`` projector: 2x2 space-to-depth of the ViT grid, then Linear-GELU-Linear.

The odd 27x27 grid is zero-padded at the bottom/right in feature space to 28x28, and ``F.unfold``
orders each merged 4C vector channel-major (``c*4 + dy*2 + dx``) — not the concatenation of four
C-vectors (spec §3). The GELU here is the exact erf form (the ViT's is tanh).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ProjectorConfig


class Projector(nn.Module):
    """features (N, g*g, C) -> tokens (N, ceil(g/r)^2, n_embed)."""

    def __init__(self, cfg: ProjectorConfig):
        super().__init__()
        self.ratio = cfg.downsample_ratio
        merged = cfg.input_dim * cfg.downsample_ratio ** 2
        self.layers = nn.Sequential(nn.Linear(merged, cfg.n_embed), nn.GELU(), nn.Linear(cfg.n_embed, cfg.n_embed))

    def merge(self, x: torch.Tensor) -> torch.Tensor:
        n, t, c = x.shape
        g = math.isqrt(t)
        x = x.reshape(n, g, g, c)
        pad = (-g) % self.ratio
        if pad:
            x = F.pad(x, (0, 0, 0, pad, 0, pad))  # (N, g+pad, g+pad, C): zero row at bottom, column at right
        x = x.permute(0, 3, 1, 2)  # (N, C, G, G)
        x = F.unfold(x, kernel_size=self.ratio, stride=self.ratio)  # (N, C*r*r, G/r * G/r), channel-major
        return x.permute(0, 2, 1)  # (N, tokens, C*r*r)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(self.merge(x))
