"""Small building blocks shared by the language model: RMSNorm, SwiGLU MLP, rotary tables.

Op order and dtype casts follow DeepSeek's ``modeling_deepseek.py`` (and transformers 4.38.2's
``LlamaRotaryEmbedding`` for Tiny) exactly, because bf16 parity depends on where rounding happens
(spec §7.2, §7.3.1, §7.4).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import cpu_kernels
from .plan import EXACT, Plan


class RMSNorm(nn.Module):
    """``weight * (x.float() * rsqrt(mean(x^2) + eps)).to(x.dtype)``: the weight multiply is in x's dtype."""

    plan: Plan = EXACT  # set per model by plan.apply

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.plan.kernels and (y := cpu_kernels.rmsnorm(self, x)) is not None:  # decode rows in one C call
            return y
        dtype = x.dtype
        y = x.to(torch.float32)
        y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * y.to(dtype)


def wide(x: torch.Tensor, plan: Plan) -> bool:
    """Whether ``x``'s GEMM runs widened to fp32 under ``plan`` (``wide_gemms``: bf16, more than
    ``cpu_kernels.MOE_MAX_TOKENS`` rows)."""
    return plan.wide_gemms and x.dtype == torch.bfloat16 and x.numel() > cpu_kernels.MOE_MAX_TOKENS * x.shape[-1]


def linear(x: torch.Tensor, layer: nn.Module, plan: Plan = EXACT) -> torch.Tensor:
    """``layer(x)`` for a bias-free linear layer (``nn.Linear`` or ``Int8Linear``), fastest kernel chosen.

    A single bf16/fp16 row on CPU goes through ``torch.mv``: the same fp32-accumulated dot products as
    ``F.linear``'s GEMM path (bit-identical, tested) but ~1.4x faster per byte of weight on this CPU
    (bench/decode.py); under a plan with ``kernels`` it goes through dsvl2's GEMV instead. Everything
    else is ``layer(x)`` (an ``Int8Linear`` included, which follows its own plan), or under a plan with
    ``wide_gemms`` a many-row product in fp32 with the weight widened for the call.
    """
    if type(layer) is nn.Linear and wide(x, plan):
        b = layer.bias
        return F.linear(x.float(), layer.weight.float(), None if b is None else b.float()).to(x.dtype)
    if (type(layer) is nn.Linear and x.device.type == "cpu" and x.dtype in (torch.bfloat16, torch.float16)
            and x.numel() == x.shape[-1] and layer.bias is None):
        if cpu_kernels.usable(plan.kernels, x, layer.weight) and layer.weight.stride(-1) == 1:  # dsvl2's GEMV
            return cpu_kernels.gemv(layer.weight, x.reshape(-1), plan.kernels).view(*x.shape[:-1], layer.out_features)
        return torch.mv(layer.weight, x.reshape(-1)).view(*x.shape[:-1], layer.out_features)
    return layer(x)


class MLP(nn.Module):
    """SwiGLU feed-forward ``down(silu(gate(x)) * up(x))``: the dense layer 0 and the shared experts."""

    plan: Plan = EXACT

    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.plan.kernels and (y := cpu_kernels.mlp(self, x)) is not None:  # one row in one C call
            return y
        p = self.plan
        return linear(F.silu(linear(x, self.gate_proj, p)) * linear(x, self.up_proj, p), self.down_proj, p)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """``[-x2, x1]`` over the last dim split in halves (the "NeoX" rotation)."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def inv_frequencies(dim: int, theta: float) -> torch.Tensor:
    """``1 / theta^(2i/dim)`` in fp32, i = 0..dim/2-1 (never rounded to bf16: spec P2)."""
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))


class RotaryTable(nn.Module):
    """cos/sin of ``pos * inv_freq`` for the concatenated layout ``[freqs, freqs]``, in two named forms.

    Angles are computed in fp32 and only the finished cos/sin are cast to the activation dtype, as the
    official ``torch_dtype=bfloat16`` loading path does (spec P2). ``tabulated=True`` reproduces
    DeepSeek's ``DeepseekV2RotaryEmbedding`` (a cos/sin table over ``arange(max_positions)`` indexed by
    position; MLA); ``tabulated=False`` reproduces transformers 4.38.2's ``LlamaRotaryEmbedding``
    (angles computed from the positions of the call; Tiny). The two agree to the last fp32 ulp or so;
    keeping each one's form keeps bf16 parity bit-exact.
    """

    def __init__(self, dim: int, theta: float, max_positions: int, tabulated: bool):
        super().__init__()
        self.dim = dim
        self.theta = theta
        self.tabulated = tabulated
        self.max_positions = max_positions
        self.register_buffer("inv_freq", inv_frequencies(dim, theta), persistent=False)
        self._table: tuple[torch.Tensor, torch.Tensor] | None = None

    def reset_(self, device: torch.device | str) -> None:
        """Rebuild the fp32 inverse frequencies on ``device`` (after a ``meta``-device build)."""
        self.inv_freq = inv_frequencies(self.dim, self.theta).to(device)
        self._table = None

    def _cos_sin_table(self, n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if self._table is None or self._table[0].shape[0] < n or self._table[0].device != device:
            t = torch.arange(max(n, self.max_positions), device=device, dtype=torch.float32)
            freqs = torch.outer(t, self.inv_freq.to(device=device, dtype=torch.float32))  # (P, dim/2)
            emb = torch.cat((freqs, freqs), dim=-1)  # (P, dim)
            self._table = (emb.cos(), emb.sin())
        return self._table

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions (B, T) int -> cos, sin (B, T, dim) in ``dtype``."""
        if self.tabulated:
            cos, sin = self._cos_sin_table(self.max_positions, positions.device)
            return cos[positions].to(dtype), sin[positions].to(dtype)
        freqs = positions.to(torch.float32)[..., None] * self.inv_freq.to(torch.float32)  # (B, T, dim/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, dim)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Half-split RoPE (Tiny / Llama): x (B, H, T, D), cos/sin (B, T, D)."""
    cos, sin = cos[:, None], sin[:, None]
    return (x * cos) + (rotate_half(x) * sin)


def deinterleave(x: torch.Tensor) -> torch.Tensor:
    """``[x0, x2, ..., x1, x3, ...]``: DeepSeek's MLA RoPE permutes pairs before rotating (spec §7.3.1)."""
    b, h, t, d = x.shape
    return x.view(b, h, t, d // 2, 2).transpose(4, 3).reshape(b, h, t, d)


def apply_rope_interleaved(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """MLA RoPE: rotate pairs (x[2i], x[2i+1]); output in the de-interleaved layout the cache keeps."""
    return apply_rope(deinterleave(x), cos, sin)
