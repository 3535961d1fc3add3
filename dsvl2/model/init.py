"""Random initialisation for models trained from scratch and for tests.

:func:`init_random_` (tests, golden fixtures) and :func:`init_weights` (from-scratch training: the demo
build and ``dsvl2 train --preset``, with the demo's sine-cosine positions and mimetic attention as options).

``init_random_``: scales keep activations O(1) through depth: weights ~ N(0, 1/fan_in) (the attention-logit
projections get gain 2 so attention is not uniform), biases small, norm weights ~1, token
embeddings N(0, 1), the learned image separators N(0, 1/sqrt(d)) as the official init, routers
decisive. The same recipe as the golden fixtures' ``make_ckpt_meta.json``.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import DSVL2Error

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


# ---- from-scratch training (the demo build, `dsvl2 train --preset`) ----------------------------------
def sincos_2d(grid: int, width: int) -> torch.Tensor:
    """(grid * grid, width) 2D sine-cosine position table (MAE's): the first half of the channels encodes the
    row, the second the column, each as sin / cos at ``width / 4`` frequencies 1 / 10000^(k / (width / 4))."""
    if width % 4:
        raise ValueError(f"sincos_2d needs a width divisible by 4, got {width}")
    omega = 1.0 / 10000 ** (torch.arange(width // 4, dtype=torch.float64) / (width // 4))
    pos = torch.arange(grid, dtype=torch.float64)
    ang = pos[:, None] * omega[None]  # (grid, width / 4)
    axis = torch.cat([ang.sin(), ang.cos()], dim=1)  # (grid, width / 2)
    rows, cols = axis[:, None, :].expand(grid, grid, -1), axis[None, :, :].expand(grid, grid, -1)
    return torch.cat([rows, cols], dim=-1).reshape(grid * grid, width).float()


def mimetic_attention_(vision: torch.nn.Module, gen: torch.Generator, qk: tuple[float, float] = (0.3, 2.0),
                       vo: tuple[float, float] = (0.4, 0.4)) -> None:
    """Mimetic initialisation of the ViT's attention (Trockman & Kolter, ICML 2023): per head
    ``W_q W_k^T ~ a Z + b I`` and for the layer ``W_proj W_v ~ a' Z' - b' I`` (``Z`` Gaussian with variance
    1 / width), by SVD. With a position table whose nearby entries are similar (the sine-cosine one),
    attention starts out looking at neighbouring patches, as a convolution would."""
    for block in vision.blocks:
        attn = block.attn
        c, h = attn.proj.weight.shape[0], attn.heads
        d = c // h
        with torch.no_grad():
            w = attn.qkv.weight  # (3C, C): q, k, v rows, each grouped by head
            for head in range(h):  # W_q^T W_k = the rank-d part of a Z + b I
                u, sv, vt = torch.linalg.svd(qk[0] * torch.randn(c, c, generator=gen) / c ** 0.5 + qk[1] * torch.eye(c))
                root = sv[:d].sqrt()
                w[head * d:(head + 1) * d] = root[:, None] * u[:, :d].T
                w[c + head * d:c + (head + 1) * d] = root[:, None] * vt[:d]
            u, sv, vt = torch.linalg.svd(vo[0] * torch.randn(c, c, generator=gen) / c ** 0.5 - vo[1] * torch.eye(c))
            w[2 * c:] = sv.sqrt()[:, None] * vt  # W_proj W_v = a' Z' - b' I, full rank
            attn.proj.weight.copy_(u * sv.sqrt()[None])


def init_weights(model: torch.nn.Module, std: float, seed: int, pos_init: str = "normal",
                 pos_scale: float = 1.0, attn_init: str = "normal") -> None:
    """From-scratch init: norms at 1 / 0, biases 0, every other tensor N(0, std) from ``seed``.

    ``pos_init = "sincos"`` starts the ViT's position table at ``pos_scale`` times :func:`sincos_2d` instead
    (still trained): every patch then knows where it is from the first step, which grounding and charts
    need and a random table has to learn first. ``attn_init = "mimetic"`` then sets the ViT's attention
    weights by :func:`mimetic_attention_` (drawn from the same generator)."""
    from .layers import RMSNorm

    if pos_init not in ("normal", "sincos"):
        raise DSVL2Error(f"recipe [model] pos_init = {pos_init!r}: expected 'normal' or 'sincos'")
    if attn_init not in ("normal", "mimetic"):
        raise DSVL2Error(f"recipe [model] attn_init = {attn_init!r}: expected 'normal' or 'mimetic'")
    gen = torch.Generator().manual_seed(seed)
    norms = set()
    for mod in model.modules():
        if isinstance(mod, (RMSNorm, torch.nn.LayerNorm)):
            norms.update(id(p) for p in mod.parameters())
            torch.nn.init.ones_(mod.weight)
            if getattr(mod, "bias", None) is not None:
                torch.nn.init.zeros_(mod.bias)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if id(p) in norms or name.endswith("e_score_correction_bias"):
                continue
            if p.dim() == 1 and name.endswith("bias"):
                p.zero_()
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * std)
        if pos_init == "sincos":
            vision = model.vision
            vision.pos_embed.copy_(pos_scale * sincos_2d(vision.cfg.grid, vision.cfg.width)[None])
        if attn_init == "mimetic":
            mimetic_attention_(model.vision, gen)
