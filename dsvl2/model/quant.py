"""Int8 / int4 weight-only quantization of the language model (``dsvl2.load(..., quantize="int8"|"int4")``).

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

Int4 (``quantize="int4"``): groups of ``INT4_GROUP`` input columns (fewer where the width is not a
multiple) share one symmetric scale ``s = max |W| / 7`` (rounded to the activation dtype), ``q = round(W / s)``
in [-7, 7], stored as ``q + 8`` two to a byte (byte j of a group: column j in the low nibble, column
j + group/2 in the high one, the layout the C kernel unpacks). 0.53 bytes a weight: 1.9x fewer than int8.
Decode reads them through dsvl2's C kernels (``cpu_kernels.gemm_int8`` / ``moe_int8``, which take both);
elsewhere the weight is dequantized to the activation dtype for an ordinary GEMM.

Quantized modules keep the metadata of the weight they replace: ``module.weight`` is an
``Int8Weight`` with the original shape, dtype and device (``DSVL2.dtype`` reads ``lm_head.weight``),
whose values cannot be used by mistake: any operation on it raises.
"""

from __future__ import annotations

from typing import Self

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputError, UsageError
from . import cpu_kernels
from .layers import linear, wide  # noqa: F401  (linear re-exported: the single-row fast path lives in layers)
from .moe import Experts, dispatch
from .plan import EXACT, Plan, plan_of
from .plan import apply as apply_plan

QUANTIZE_MODES = ("int8", "int4")
INT4_GROUP = 64  # input columns per int4 scale
KERNEL_MAX_ROWS = 16  # _weight_int8pack_mm beats convert+GEMM up to here (measured once; docs/performance.md)
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


def int8_linear(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, plan: Plan = EXACT) -> torch.Tensor:
    """x (..., I), q (O, I) int8, scale (O,) in x's dtype -> (..., O) in x's dtype, as ``plan`` says."""
    kernels = plan.kernels
    k = x.shape[-1]
    rows = x.numel() // k if k else 0
    if 0 < rows <= cpu_kernels.MOE_MAX_TOKENS and q.stride(-1) == 1 and cpu_kernels.usable_int8(kernels, x, q, scale):
        return cpu_kernels.gemm_int8(q, scale, x.reshape(rows, k), kernels).view(*x.shape[:-1], q.shape[0])
    if x.device.type == "cpu" and k % 16 == 0 and 0 < rows <= KERNEL_MAX_ROWS:
        y = torch._weight_int8pack_mm(x.reshape(rows, k).contiguous(), q, scale)  # (rows, O)
        return y.view(*x.shape[:-1], q.shape[0])
    if wide(x, plan):
        return (F.linear(x.float(), q.float()) * scale.float()).to(x.dtype)
    return F.linear(x, q.to(x.dtype)) * scale


def int4_group(in_features: int) -> int:
    """The int4 group size for rows of ``in_features``: ``INT4_GROUP``, or the largest power of two below
    it that divides the width (toy models); at least 2."""
    group = INT4_GROUP
    while in_features % group:
        group //= 2
    if group < 2:
        raise InputError(f"int4 needs an even input width, got {in_features}")
    return group


@torch.no_grad()
def quantize_int4(w: torch.Tensor, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """w (..., O, I) -> packed uint8 q (..., O, I / 2) and group scales (..., O, I / group) in ``dtype``."""
    dtype = dtype or w.dtype
    i = w.shape[-1]
    group = int4_group(i)
    flat = w.reshape(-1, i // group, group)  # (R, G, group)
    q = torch.empty(flat.shape[0], i // 2, dtype=torch.uint8, device=w.device)
    scale = torch.empty(flat.shape[:2], dtype=dtype, device=w.device)
    for start in range(0, flat.shape[0], _CHUNK):
        rows = flat[start:start + _CHUNK].float()  # (r, G, group)
        s = (rows.abs().amax(dim=-1) / 7).clamp_min(torch.finfo(dtype).tiny).to(dtype)  # (r, G)
        scale[start:start + _CHUNK] = s
        v = (rows / s.float().unsqueeze(-1)).round_().clamp_(-7, 7).to(torch.uint8) + 8  # (r, G, group) nibbles
        lo, hi = v[..., :group // 2], v[..., group // 2:]
        q[start:start + _CHUNK] = (lo | (hi << 4)).reshape(rows.shape[0], -1)
    return q.view(*w.shape[:-1], i // 2), scale.view(*w.shape[:-1], i // group)


def dequantize_int4(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The values ``quantize_int4`` packed: (..., O, I), the products q * s in ``scale``'s dtype (exact in fp32
    and fp64; bf16 rounds them)."""
    ng = scale.shape[-1]
    b = q.view(*q.shape[:-1], ng, -1)  # (..., O, G, group / 2)
    v = torch.cat([(b & 15), (b >> 4)], dim=-1).to(torch.int8) - 8  # (..., O, G, group)
    return (v.to(scale.dtype) * scale.unsqueeze(-1)).flatten(-2)


def int4_linear(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, plan: Plan = EXACT) -> torch.Tensor:
    """x (..., I), packed int4 q (O, I / 2), scales (O, I / group) in x's dtype -> (..., O) in x's dtype."""
    kernels = plan.kernels
    k = x.shape[-1]
    rows = x.numel() // k if k else 0
    if 0 < rows <= cpu_kernels.MOE_MAX_TOKENS and cpu_kernels.usable(kernels, x, scale) and q.device.type == "cpu":
        return cpu_kernels.gemm_int8(q, scale, x.reshape(rows, k), kernels).view(*x.shape[:-1], q.shape[0])
    if wide(x, plan):
        return F.linear(x.float(), dequantize_int4(q, scale.float())).to(x.dtype)
    return F.linear(x, dequantize_int4(q, scale.float()).to(x.dtype))  # q * s rounded once


class Int8Weight(torch.Tensor):
    """Shape, dtype and device of a quantized weight, without its values: any operation raises UsageError."""

    @staticmethod
    def __new__(cls, shape: torch.Size, dtype: torch.dtype, device: torch.device) -> Self:
        return torch.Tensor._make_wrapper_subclass(cls, shape, dtype=dtype, device=device)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        raise UsageError(f"{func}: this weight is int8-quantized; call its module (or load without quantize=)")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(shape={tuple(self.shape)}, dtype={self.dtype}, device={self.device})"


class Int4Weight(Int8Weight):
    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        raise UsageError(f"{func}: this weight is int4-quantized; call its module (or load without quantize=)")


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
        return int8_linear(x, self.weight_int8, self.weight_scale, self.plan)


class Int4Linear(nn.Module):
    """A bias-free ``nn.Linear`` with int4 weights: ``weight_int4`` (O, I / 2) uint8, ``weight_scale``
    (O, I / group)."""

    plan: Plan = EXACT  # set per model by plan.apply

    def __init__(self, out_features: int, in_features: int, dtype: torch.dtype, device: torch.device | str):
        super().__init__()
        group = int4_group(in_features)
        self.register_buffer("weight_int4", torch.empty(out_features, in_features // 2, dtype=torch.uint8,
                                                        device=device))
        self.register_buffer("weight_scale", torch.empty(out_features, in_features // group, dtype=dtype,
                                                         device=device))

    @property
    def weight(self) -> Int4Weight:
        q = self.weight_int4
        return Int4Weight(torch.Size((q.shape[0], 2 * q.shape[1])), self.weight_scale.dtype, q.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return int4_linear(x, self.weight_int4, self.weight_scale, self.plan)


class _QuantizedExperts(nn.Module):
    """Routed experts with quantized weights ``{gate,up,down}_proj_<SUFFIX>`` and ``*_scale`` per expert.

    No grouped quantized kernel exists, so off the fused decode kernel experts run one by one on their
    rows (the count is read on the host: free on CPU, where these kernels live); dispatch and combine
    are ``moe.dispatch``. Subclasses give the buffer layout, the weight descriptor and the linear.
    """

    NAMES = ("gate_proj", "up_proj", "down_proj")
    SUFFIX = ""
    plan: Plan = EXACT  # set per model by plan.apply

    def __init__(self, n_experts: int, hidden: int, intermediate: int, dtype: torch.dtype,
                 device: torch.device | str):
        super().__init__()
        shapes = {"gate_proj": (intermediate, hidden), "up_proj": (intermediate, hidden),
                  "down_proj": (hidden, intermediate)}
        for name, (o, i) in shapes.items():
            q, scale = self._empty(n_experts, o, i, dtype, device)
            self.register_buffer(f"{name}_{self.SUFFIX}", q)
            self.register_buffer(f"{name}_scale", scale)

    def _empty(self, n: int, o: int, i: int, dtype: torch.dtype,
               device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def _weight(self, name: str) -> Int8Weight | Int4Weight:
        raise NotImplementedError

    @staticmethod
    def _linear(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, plan: Plan) -> torch.Tensor:
        raise NotImplementedError

    gate_proj = property(lambda self: self._weight("gate_proj"))
    up_proj = property(lambda self: self._weight("up_proj"))
    down_proj = property(lambda self: self._weight("down_proj"))

    def pairs(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(quantized weight, scale) of gate, up and down, each (E, ...)."""
        return [(getattr(self, f"{n}_{self.SUFFIX}"), getattr(self, f"{n}_scale")) for n in self.NAMES]

    def _per_expert(self, rows: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        (gq, gs), (uq, us), (dq, ds) = self.pairs()
        lin, p = self._linear, self.plan
        outs, start = [], 0
        for e, c in enumerate(counts.tolist()):
            if c:
                r = rows[start:start + c]
                h = F.silu(lin(r, gq[e], gs[e], p)) * lin(r, uq[e], us[e], p)
                outs.append(lin(h, dq[e], ds[e], p))
                start += c
        return torch.cat(outs, dim=0)


class Int8Experts(_QuantizedExperts):
    """Routed experts with int8 weights: ``{gate,up,down}_proj_int8`` (E, O, I) and ``*_scale`` (E, O)."""

    SUFFIX = "int8"
    _linear = staticmethod(int8_linear)

    def _empty(self, n, o, i, dtype, device):  # type: ignore[no-untyped-def]
        return (torch.empty(n, o, i, dtype=torch.int8, device=device),
                torch.empty(n, o, dtype=dtype, device=device))

    def _weight(self, name: str) -> Int8Weight:
        q = getattr(self, f"{name}_int8")
        return Int8Weight(q.shape, getattr(self, f"{name}_scale").dtype, q.device)

    def forward(self, x: torch.Tensor, idx: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        isa = self.plan.kernels
        pairs = self.pairs()
        if x.shape[0] <= cpu_kernels.MOE_MAX_TOKENS and cpu_kernels.usable_int8(isa, x, *pairs[0]):
            return cpu_kernels.moe_int8(x, *pairs, idx, weight, isa)  # the fused decode kernel
        return dispatch(x, idx, weight, pairs[0][0].shape[0], self._per_expert)


class Int4Experts(_QuantizedExperts):
    """Routed experts with int4 weights: ``{gate,up,down}_proj_int4`` (E, O, I / 2), ``*_scale`` (E, O, I / group)."""

    SUFFIX = "int4"
    _linear = staticmethod(int4_linear)

    def _empty(self, n, o, i, dtype, device):  # type: ignore[no-untyped-def]
        return (torch.empty(n, o, i // 2, dtype=torch.uint8, device=device),
                torch.empty(n, o, i // int4_group(i), dtype=dtype, device=device))

    def _weight(self, name: str) -> Int4Weight:
        q = getattr(self, f"{name}_int4")
        return Int4Weight(torch.Size((*q.shape[:-1], 2 * q.shape[-1])), getattr(self, f"{name}_scale").dtype, q.device)

    def forward(self, x: torch.Tensor, idx: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        isa = self.plan.kernels
        pairs = self.pairs()
        if x.shape[0] <= cpu_kernels.MOE_MAX_TOKENS and cpu_kernels.usable(isa, x, pairs[0][1]):
            return cpu_kernels.moe_int8(x, *pairs, idx, weight, isa)  # the fused decode kernel (int4 form)
        return dispatch(x, idx, weight, pairs[0][0].shape[0], self._per_expert)


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


def weight_bytes(model: nn.Module, width: int, mode: str | None) -> tuple[int, int]:
    """(bytes of ``model``'s weights loaded in a dtype of ``width`` bytes with ``quantize=mode``, bytes of
    its largest tensor in that dtype: what loading holds besides the model). A meta-device model will do."""
    targets = int8_targets(model) if mode else {}
    total = largest = 0
    for name, p in model.named_parameters():
        largest = max(largest, p.numel() * width)
        i = p.shape[-1]
        rows = p.numel() // i
        if name not in targets:
            total += p.numel() * width
        elif mode == "int8":
            total += rows * i + rows * width
        else:
            total += rows * i // 2 + rows * (i // int4_group(i)) * width
    return total, largest


def quantized_names(name: str, mode: str = "int8") -> tuple[str, str]:
    """State-dict names of the quantized values and the scales that replace parameter ``name``."""
    return f"{name}_{mode}", f"{name}_scale"


QUANTIZERS = {"int8": quantize_int8, "int4": quantize_int4}
_MODULES = {"int8": (Int8Linear, Int8Experts), "int4": (Int4Linear, Int4Experts)}


def swap_int8_modules_(model: nn.Module, dtype: torch.dtype, mode: str = "int8") -> None:
    """Replace every target module by its ``mode`` twin (uninitialised buffers on the module's device)."""
    linear_cls, experts_cls = _MODULES[mode]
    modules = dict(model.named_modules())
    for name in sorted({n.rsplit(".", 1)[0] for n in int8_targets(model)}):
        parent_name, _, child = name.rpartition(".")
        old = modules[name]
        if isinstance(old, Experts):
            e, i, d = old.gate_proj.shape
            new: nn.Module = experts_cls(e, d, i, dtype, old.gate_proj.device)
        else:
            new = linear_cls(old.out_features, old.in_features, dtype, old.weight.device)
        setattr(modules[parent_name], child, new)


@torch.no_grad()
def quantize_model_(model: nn.Module, mode: str = "int8") -> nn.Module:
    """Quantize an in-memory model in place (loading does the same tensor by tensor, see checkpoint.py)."""
    check_mode(mode)
    params = dict(model.named_parameters())
    state = {}
    for name in int8_targets(model):
        p = params[name]
        state.update(zip(quantized_names(name, mode), QUANTIZERS[mode](p.detach(), p.dtype)))
    dtype = model.language.model.norm.weight.dtype
    swap_int8_modules_(model, dtype, mode)
    for name, value in state.items():
        path, _, buf = name.rpartition(".")
        getattr(model.get_submodule(path), buf).copy_(value)
    return apply_plan(model, plan_of(model))  # the new modules run the model's plan
