"""Random initialisation: one rule, for models trained from scratch, tests, benches and fixtures.

:func:`init_params_` sorts every parameter into a class by its name (so it also fills a bare dict of
parameters, as ``bench/make_checkpoint.py`` does tensor by tensor) and draws it from that class's
distribution, in ``named_parameters`` order from one generator. ``std`` sets the scale of every
tensor that is not a norm or bias; the other arguments set one class each. Every tensor is normal,
mean 0 except the norm weights' 1, with the standard deviation

class (by parameter name)                   std="fan_in"                std=s (a number)
norm weights (mean 1)                       norm_jitter                 norm_jitter
biases (norm biases too)                    bias_std                    bias_std
noaux e_score_correction_bias               correction_std              correction_std
token embeddings                            1                           s
image_newline, view_separator, any vector   1 / sqrt(d)                 s
ViT pos_embed                               0.5                         s
MoE routers (mlp.gate)                      router_gain / sqrt(fan_in)  router_gain * s
attention q/k (q_proj, k_proj, kv_b_proj,   qk_gain / sqrt(fan_in)      qk_gain * s
  kv_a_proj_with_mqa, the ViT's attn.qkv)
other matrices, stacked experts, convs      1 / sqrt(fan_in)            s

A class whose standard deviation is 0 takes no draw (norm weights exactly 1, biases exactly 0). With
``"fan_in"`` activations stay O(1) through depth; token embeddings N(0, 1) keep text tokens as loud as
O(1) image embeddings, the separators follow the official init, a position table at 0.5 makes patch
order matter. ``fan_in`` is a matrix's last dimension (a conv's ``in * kh * kw``).

Who calls it with what:

- from-scratch training (the demo build ``dsvl2/demo/build.py``, ``dsvl2 train --preset``,
  ``bench/vision_probe.py``, ``tests/training_helpers.py``): ``std=0.02`` (the recipe's ``init_std``),
  everything else at its default (norms 1, biases and correction biases 0, gains 1), with the demo's
  ``pos_init="sincos"`` and ``attn_init="mimetic"`` as options on top (:func:`sincos_2d`,
  :func:`mimetic_attention_`);
- tests, benches and the golden fixtures' recipe (``make_ckpt_meta.json``): ``**FIXTURE_INIT``
  (``tests/toy.py``, ``bench/decode.py``, ``bench/make_checkpoint.py``);
- the transformers parity tests (``tests/test_reference.py``): ``**FIXTURE_INIT, router_gain=4.0``,
  so that routing is decisive and fp32 noise cannot flip an expert.

``tests/test_init.py`` pins the numbers of the first two (sha256 of every parameter).
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import ConfigError

# The tests' / benches' / golden fixtures' recipe: scales that keep activations O(1), attention not uniform.
FIXTURE_INIT = dict(std="fan_in", qk_gain=2.0, norm_jitter=0.1, bias_std=0.02, correction_std=0.1)
_QK = ("q_proj", "k_proj", "kv_a_proj_with_mqa", "kv_b_proj", "attn.qkv")
_SEPARATORS = ("image_newline", "view_separator")


@torch.no_grad()
def init_params_(model: nn.Module, seed: int, *, std: float | str, qk_gain: float = 1.0, router_gain: float = 1.0,
                 norm_jitter: float = 0.0, bias_std: float = 0.0, correction_std: float = 0.0,
                 pos_init: str = "normal", pos_scale: float = 1.0, attn_init: str = "normal") -> nn.Module:
    """Fill every parameter of ``model`` in place by the rule of the module docstring; returns the model.

    ``pos_init="sincos"`` then sets the ViT's position table to ``pos_scale`` times :func:`sincos_2d`
    (still trained): every patch knows where it is from the first step, which grounding and charts need
    and a random table has to learn first. ``attn_init="mimetic"`` then sets the ViT's attention weights
    by :func:`mimetic_attention_`, drawn from the same generator."""
    fan_in_scaled = std == "fan_in"
    if not fan_in_scaled and not (isinstance(std, (int, float)) and std > 0):
        raise ConfigError(f"init std = {std!r}: expected a positive number or 'fan_in'")
    if pos_init not in ("normal", "sincos"):
        raise ConfigError(f"recipe [model] pos_init = {pos_init!r}: expected 'normal' or 'sincos'")
    if attn_init not in ("normal", "mimetic"):
        raise ConfigError(f"recipe [model] attn_init = {attn_init!r}: expected 'normal' or 'mimetic'")
    g = torch.Generator().manual_seed(seed)

    def normal(p: torch.Tensor, s: float, mean: float) -> None:  # no draw outlives its parameter (peak memory)
        x = torch.randn(p.shape, generator=g, dtype=torch.float32) * s
        p.copy_(x + mean if mean else x)

    def matrix_std(p: torch.Tensor, gain: float) -> float:
        if not fan_in_scaled:
            return gain * std
        return gain * (p.shape[-1] if p.dim() != 4 else p[0].numel()) ** -0.5

    for name, p in model.named_parameters():
        parts = name.rsplit(".", 2)
        leaf, parent = parts[-1], parts[-2] if len(parts) > 1 else ""
        mean = 0.0
        if "norm" in parent and leaf == "weight":
            s, mean = norm_jitter, 1.0
        elif leaf == "bias":
            s = bias_std
        elif leaf == "e_score_correction_bias":
            s = correction_std
        elif name.endswith("embed_tokens.weight"):
            s = 1.0 if fan_in_scaled else std
        elif leaf == "pos_embed":
            s = 0.5 if fan_in_scaled else std
        elif leaf in _SEPARATORS or p.dim() < 2:
            s = p.shape[-1] ** -0.5 if fan_in_scaled else std
        elif parent == "gate" and leaf == "weight":
            s = matrix_std(p, router_gain)
        else:
            s = matrix_std(p, qk_gain if any(k in name for k in _QK) else 1.0)
        if s:
            normal(p, s, mean)
        else:
            p.fill_(mean)
    if pos_init == "sincos":
        vision = model.vision
        vision.pos_embed.copy_(pos_scale * sincos_2d(vision.cfg.grid, vision.cfg.width)[None])
    if attn_init == "mimetic":
        mimetic_attention_(model.vision, g)
    return model


def sincos_2d(grid: int, width: int) -> torch.Tensor:
    """(grid * grid, width) 2D sine-cosine position table (MAE's): the first half of the channels encodes the
    row, the second the column, each as sin / cos at ``width / 4`` frequencies 1 / 10000^(k / (width / 4))."""
    if width % 4:
        raise ConfigError(f"sincos_2d: the vision width {width} is not divisible by 4 (sin and cos of rows and "
                          f"columns each take a quarter of the channels)")
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
