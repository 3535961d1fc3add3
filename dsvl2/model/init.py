"""Random initialisation for models trained from scratch and for tests.

Scales keep activations O(1) through depth: weights ~ N(0, 1/fan_in) (the attention-logit
projections get gain 2 so attention is not uniform), biases small, norm weights ~1, token
embeddings N(0, 1), the learned image separators N(0, 1/sqrt(d)) as the official init, routers
decisive. The same recipe as the golden fixtures' ``make_ckpt_meta.json``.
"""

from __future__ import annotations

import torch
from torch import nn

_QK = ("q_proj", "k_proj", "kv_a_proj_with_mqa", "kv_b_proj", "attn.qkv")


@torch.no_grad()
def init_random_(model: nn.Module, seed: int = 0, std_scale: float = 1.0) -> nn.Module:
    """Fill every parameter of ``model`` in place (deterministic for a seed); returns the model."""
    g = torch.Generator().manual_seed(seed)

    def normal(p: torch.Tensor, std: float, mean: float = 0.0) -> None:
        p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float32) * std + mean)

    for name, p in model.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        if name.endswith("embed_tokens.weight"):
            normal(p, 1.0)
        elif name in ("image_newline", "view_separator"):
            normal(p, p.shape[-1] ** -0.5)
        elif name.endswith("pos_embed"):
            normal(p, 0.5)
        elif leaf == "e_score_correction_bias":
            normal(p, 0.1)
        elif "norm" in name and leaf == "weight":
            normal(p, 0.1, 1.0)
        elif leaf == "bias":
            normal(p, 0.02)
        elif p.dim() >= 2:
            fan_in = p.shape[-1] if p.dim() != 4 else p[0].numel()
            gain = 2.0 if any(k in name for k in _QK) else 1.0
            normal(p, gain * std_scale * fan_in ** -0.5)
        else:
            normal(p, 0.02)
    return model
