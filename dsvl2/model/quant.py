"""Int8 weight-only quantization of the language model (``dsvl2.load(..., quantize="int8")``).

Decoding at batch 1 reads every activated weight once per token, so its speed is set by the bytes
of those weights: int8 halves them against bf16. Each output channel ``o`` of a weight ``W (O, I)``
gets one symmetric scale ``s_o = max_i |W_oi| / 127`` (rounded to the activation dtype first, so
that ``q_oi = round(W_oi / s_o)`` is quantized against the scale actually used), and ``y = (x @ q^T) * s``.
Stacked experts ``(E, O, I)`` get a scale per expert and channel ``(E, O)``.

What is quantized: every ``nn.Linear`` of the language model (attention projections, dense and shared
FFNs, ``lm_head``) and the routed experts. What is not: the router (fp32 by the reference's
precision rule), the embeddings (a lookup reads one row), the norms, MLA's ``kv_b_proj`` (the absorbed
form reads its weight as a matrix, and it is ~2% of the bytes), the vision tower and projector
(compute-bound prefill work, where weight-only int8 saves no time).

Kernels: on CPU ``torch._weight_int8pack_mm`` (int8 weights read directly, fp32 accumulation, the
scale applied to the output) for up to ``KERNEL_MAX_ROWS`` rows; it needs the input width to be a
multiple of 16 (other widths crash or return garbage in torch 2.13) and re-reads the weight for every
block of rows, so long inputs (prefill) instead convert ``q`` to the activation dtype and run the
ordinary GEMM, which is compute-bound there anyway. Elsewhere (CUDA) the same conversion is the
fallback: correct, memory-saving, not faster.

Quantized modules keep the metadata of the weight they replace: ``module.weight`` is an
``Int8Weight`` with the original shape, dtype and device (``DSVL2.dtype`` reads ``lm_head.weight``),
whose values cannot be used by mistake: any operation on it raises.
"""

from __future__ import annotations

from typing import Self

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputError
from . import cpu_kernels
from .plan import EXACT, Plan, plan_of
from .plan import apply as apply_plan
from .layers import linear  # noqa: F401  (re-exported: the single-row fast path lives in layers)
from .moe import Experts, dispatch

QUANTIZE_MODES = ("int8",)
KERNEL_MAX_ROWS = 16  # _weight_int8pack_mm beats convert+GEMM up to here (bench/int8_kernels.py)
_CHUNK = 4096  # rows quantized at a time: keeps the fp32 temporaries small while loading


def check_mode(quantize: str | None) -> None:
    if quantize is not None and quantize not in QUANTIZE_MODES:
        raise InputError(f"unknown quantize mode {quantize!r}; choose one of {list(QUANTIZE_MODES)} or None")


@torch.no_grad()
def quantize_int8(w: torch.Tensor, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """w (..., O, I) -> int8 q (..., O, I) and scale (..., O) in ``dtype`` (default w's), w ~= q * scale."""
    dtype = dtype or w.dtype
    flat = w.reshape(-1, w.shape[-1])  # (R, I)
    q = torch.empty(flat.shape, dtype=torch.int8, device=w.device)
    scale = torch.empty(flat.shape[0], dtype=dtype, device=w.device)
    for start in range(0, flat.shape[0], _CHUNK):
        rows = flat[start:start + _CHUNK].float()  # (r, I)
        s = (rows.abs().amax(dim=-1) / 127).clamp_min(torch.finfo(dtype).tiny).to(dtype)  # (r,)
        scale[start:start + _CHUNK] = s
        q[start:start + _CHUNK] = (rows / s.float().unsqueeze(-1)).round_().clamp_(-127, 127).to(torch.int8)
    return q.view(w.shape), scale.view(w.shape[:-1])


def int8_linear(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, kernels: str | None = None) -> torch.Tensor:
    """x (..., I), q (O, I) int8, scale (O,) in x's dtype -> (..., O) in x's dtype (``kernels``: a plan's build)."""
    k = x.shape[-1]
    rows = x.numel() // k if k else 0
    if 0 < rows <= cpu_kernels.MOE_MAX_TOKENS and q.stride(-1) == 1 and cpu_kernels.usable_int8(kernels, x, q, scale):
        return cpu_kernels.gemm_int8(q, scale, x.reshape(rows, k), kernels).view(*x.shape[:-1], q.shape[0])
    if x.device.type == "cpu" and k % 16 == 0 and 0 < rows <= KERNEL_MAX_ROWS:
        y = torch._weight_int8pack_mm(x.reshape(rows, k).contiguous(), q, scale)  # (rows, O)
        return y.view(*x.shape[:-1], q.shape[0])
    return F.linear(x, q.to(x.dtype)) * scale


class Int8Weight(torch.Tensor):
    """Shape, dtype and device of a quantized weight, without its values: any operation raises RuntimeError."""

    @staticmethod
    def __new__(cls, shape: torch.Size, dtype: torch.dtype, device: torch.device) -> Self:
        return torch.Tensor._make_wrapper_subclass(cls, shape, dtype=dtype, device=device)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        raise RuntimeError(f"{func}: this weight is int8-quantized; call its module (or load without quantize=)")

    def __repr__(self) -> str:
        return f"Int8Weight(shape={tuple(self.shape)}, dtype={self.dtype}, device={self.device})"


class Int8Linear(nn.Module):
    """A bias-free ``nn.Linear`` with int8 weights: buffers ``weight_int8`` (O, I), ``weight_scale`` (O,)."""

    plan: Plan = EXACT  # set per model by plan.apply

    def __init__(self, out_features: int, in_features: int, dtype: torch.dtype, device: torch.device | str):
        super().__init__()
        self.register_buffer("weight_int8", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("weight_scale", torch.empty(out_features, dtype=dtype, device=device))

    @property
    def weight(self) -> Int8Weight:
        return Int8Weight(self.weight_int8.shape, self.weight_scale.dtype, self.weight_int8.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return int8_linear(x, self.weight_int8, self.weight_scale, self.plan.kernels)


class Int8Experts(nn.Module):
    """Routed experts with int8 weights: ``{gate,up,down}_proj_int8`` (E, O, I) and ``*_scale`` (E, O).

    No grouped int8 kernel exists, so experts run one by one on their rows (the count is read on the
    host: free on CPU, where the int8 kernel lives); dispatch and combine are ``moe.dispatch``.
    """

    NAMES = ("gate_proj", "up_proj", "down_proj")
    plan: Plan = EXACT  # set per model by plan.apply

    def __init__(self, n_experts: int, hidden: int, intermediate: int, dtype: torch.dtype,
                 device: torch.device | str):
        super().__init__()
        shapes = {"gate_proj": (intermediate, hidden), "up_proj": (intermediate, hidden),
                  "down_proj": (hidden, intermediate)}
        for name, (o, i) in shapes.items():
            self.register_buffer(f"{name}_int8", torch.empty(n_experts, o, i, dtype=torch.int8, device=device))
            self.register_buffer(f"{name}_scale", torch.empty(n_experts, o, dtype=dtype, device=device))

    def _weight(self, name: str) -> Int8Weight:
        q = getattr(self, f"{name}_int8")
        return Int8Weight(q.shape, getattr(self, f"{name}_scale").dtype, q.device)

    gate_proj = property(lambda self: self._weight("gate_proj"))
    up_proj = property(lambda self: self._weight("up_proj"))
    down_proj = property(lambda self: self._weight("down_proj"))

    def forward(self, x: torch.Tensor, idx: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        isa = self.plan.kernels
        if x.shape[0] <= cpu_kernels.MOE_MAX_TOKENS and cpu_kernels.usable_int8(isa, x, self.gate_proj_int8,
                                                                                 self.gate_proj_scale):
            return cpu_kernels.moe_int8(x, (self.gate_proj_int8, self.gate_proj_scale),  # the fused decode kernel
                                        (self.up_proj_int8, self.up_proj_scale),
                                        (self.down_proj_int8, self.down_proj_scale), idx, weight, isa)
        return dispatch(x, idx, weight, self.gate_proj_int8.shape[0], self._per_expert)

    def _per_expert(self, rows: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        outs, start = [], 0
        for e, c in enumerate(counts.tolist()):
            if c:
                r = rows[start:start + c]
                h = (F.silu(int8_linear(r, self.gate_proj_int8[e], self.gate_proj_scale[e]))
                     * int8_linear(r, self.up_proj_int8[e], self.up_proj_scale[e]))
                outs.append(int8_linear(h, self.down_proj_int8[e], self.down_proj_scale[e]))
                start += c
        return torch.cat(outs, dim=0)


def int8_targets(model: nn.Module) -> dict[str, str]:
    """Parameter name -> the kind of module holding it ("linear" | "experts"), for every quantized weight."""
    found = {}
    for path, module in model.language.named_modules(prefix="language"):
        if isinstance(module, Experts):
            found.update({f"{path}.{n}": "experts" for n in Int8Experts.NAMES})
        elif isinstance(module, nn.Linear) and not path.endswith("kv_b_proj"):
            if module.bias is not None:
                raise InputError(f"{path}: int8 quantization handles bias-free linears only")
            found[f"{path}.weight"] = "linear"
    return found


def quantized_names(name: str) -> tuple[str, str]:
    """State-dict names of the int8 values and the scales that replace parameter ``name``."""
    return f"{name}_int8", f"{name}_scale"


def swap_int8_modules_(model: nn.Module, dtype: torch.dtype) -> None:
    """Replace every target module by its int8 twin (uninitialised buffers on the module's device)."""
    modules = dict(model.named_modules())
    for name in sorted({n.rsplit(".", 1)[0] for n in int8_targets(model)}):
        parent_name, _, child = name.rpartition(".")
        old = modules[name]
        if isinstance(old, Experts):
            e, i, d = old.gate_proj.shape
            new: nn.Module = Int8Experts(e, d, i, dtype, old.gate_proj.device)
        else:
            new = Int8Linear(old.out_features, old.in_features, dtype, old.weight.device)
        setattr(modules[parent_name], child, new)


@torch.no_grad()
def quantize_model_(model: nn.Module) -> nn.Module:
    """Quantize an in-memory model in place (loading does the same tensor by tensor, see checkpoint.py)."""
    params = dict(model.named_parameters())
    state = {}
    for name in int8_targets(model):
        p = params[name]
        state.update(zip(quantized_names(name), quantize_int8(p.detach(), p.dtype)))
    dtype = model.language.model.norm.weight.dtype
    swap_int8_modules_(model, dtype)
    for name, value in state.items():
        path, _, buf = name.rpartition(".")
        getattr(model.get_submodule(path), buf).copy_(value)
    return apply_plan(model, plan_of(model))  # the new modules run the model's plan
