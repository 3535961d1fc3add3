"""dsvl2's CPU decode kernels: GEMV and a fused routed-experts step (bf16 and int8), one MHA / MLA decode
step, RMSNorm, the router, and the vision tower's tanh-GELU, for every CPU.

Batch-1 decode on CPU is bound by reading the weights; torch's bf16 GEMV streams them at 45-75 % of
the machine's read bandwidth, its int8 kernel (``_weight_int8pack_mm``) is compute-bound at 8-11 GB/s,
and the routed experts cost a dozen small ops per layer. The C kernels in ``csrc/cpu_kernels.c``
stream the weights over torch's OpenMP threads and run the six chosen experts of a token (gate, up,
SiLU, down, weighted sum) in one call. The int8 kernels serve the weight-only int8 model of
:mod:`dsvl2.model.quant`. One kernel serves the vision tower rather than decode: its tanh-GELU
(:func:`gelu_tanh`), which torch runs 4.5x slower than its erf GELU in bf16 here.

One C source is compiled once per instruction set (``ISAS``, best first): ``avx512`` (AVX512-BF16 and
VNNI dot products), ``avx2`` (AVX2 + FMA + F16C, plain C the compiler vectorises) and ``generic`` (the
same plain C for the baseline ISA: any x86-64, arm64). :func:`host_isa` picks the best build this CPU
runs; ``$DSVL2_CPU_ISA`` (one of ``ISAS``) forces one, e.g. ``DSVL2_CPU_ISA=avx2`` runs the portable
path on an AVX512 machine (how CI exercises both).

They round where the reference rounds but accumulate the dot products in another order (and int8
weights quantize the activations to int16, ~256x finer than their bf16 rounding; int4 weights to int8 per
weight group, llama.cpp's Q4 x Q8 scheme), so results are bf16-close rather than bit-identical to the
reference path.

A build is compiled on first use with the system C compiler (``$CC``, default ``gcc``; about a second)
into ``$DSVL2_CACHE_DIR`` (default ``~/.cache/dsvl2``), keyed by the source's hash and the flags. Used
only for bf16 activations on CPU (bf16 or int8 weights), without autograd; everything else keeps the
torch path.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch.nn.utils import parametrize

from ..errors import InputError

SOURCE = Path(__file__).with_name("csrc") / "cpu_kernels.c"
FLAGS = ["-O3", "-shared", "-fPIC", "-fopenmp"]
ISAS = ("avx512", "avx2", "generic")  # best first
ISA_FLAGS = {
    # 256-bit vectors for the plain loops (the intrinsics are 512-bit): with 512 gcc leaves int4's 32-byte
    # unpack loops to the scalar epilogue (5x slower int4 GEMV, measured)
    "avx512": ["-DDSVL2_AVX512", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni", "-mavx512bf16", "-mavx2",
               "-mfma", "-mf16c", "-mprefer-vector-width=256"],
    "avx2": ["-mavx2", "-mfma", "-mf16c"],
    "generic": [],
}
ISA_ENV = "DSVL2_CPU_ISA"
MOE_MAX_TOKENS = 8  # rows per kernel call (decode batches); an expert or weight row is read once for all of them

_state: dict[str, Any] = {"libs": {}, "errors": {}}


def _cache_dir() -> Path:
    return Path(os.environ.get("DSVL2_CACHE_DIR") or Path.home() / ".cache" / "dsvl2")


def _compile(isa: str) -> Path:
    cc = os.environ.get("CC", "gcc")
    flags = [*FLAGS, *ISA_FLAGS[isa]]
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join([cc, *flags]).encode()).hexdigest()[:16]
    target = _cache_dir() / f"cpu_kernels-{isa}-{key}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
        os.close(fd)
        try:
            try:
                proc = subprocess.run([cc, *flags, str(SOURCE), "-o", tmp, "-lm"], capture_output=True, text=True,
                                      check=False)
            except FileNotFoundError:
                raise OSError(f"no C compiler {cc!r} to build {SOURCE.name} (install gcc or set $CC)") from None
            if proc.returncode != 0:
                raise OSError(f"{cc} failed on {SOURCE} ({isa} build):\n{proc.stderr.strip()[-2000:]}")
            os.replace(tmp, target)  # atomic: concurrent builders each write their own temp file
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return target


def _declare(lib: ctypes.CDLL) -> None:
    p, i64, f32, c_int = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int
    signatures = {
        "dsvl2_build": ([], c_int),
        "dsvl2_cpu_features": ([], c_int),
        "dsvl2_gemv_bf16": ([p, i64, i64, i64, p, p], None),
        "dsvl2_moe_bf16": ([p, i64, i64, p, p, p, i64, p, p, i64, p, p, p, p, p, p, i64, p, p], None),
        "dsvl2_gemm_int8": ([p, i64, i64, i64, p, p, i64, p, i64], None),
        "dsvl2_gemm_q_f32": ([p, i64, i64, i64, p, p, i64, p, i64], None),
        "dsvl2_moe_int8": ([p, i64, i64, p, p, p, p, p, p, i64, p, p, i64, p, p, p, i64, i64, p, p, p, p, p, p, i64,
                            i64, p, p], None),
        "dsvl2_mha_decode": ([p, i64, i64, i64, p, p, p, p, p, p, p, p, p, p, p, p, i64, i64, f32, p, i64], None),
        "dsvl2_mla_decode": ([p, i64, i64, i64, i64, i64, i64, p, p, p, p, p, f32, p, p, p, p, p, p, p, i64, f32, p,
                              i64, i64], None),
        "dsvl2_rmsnorm_bf16": ([p, i64, i64, p, f32, p], None),
        "dsvl2_router": ([p, i64, p, i64, i64, c_int, p, c_int, f32, p, p, p], None),
        "dsvl2_gelu_tanh_bf16": ([p, i64, p], None),
    }
    for name, (args, res) in signatures.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, res


def _load(isa: str) -> ctypes.CDLL:
    """The ``isa`` build of the kernels, compiled on first use (``OSError`` naming the reason if it cannot be)."""
    if isa in _state["libs"]:
        return _state["libs"][isa]
    if isa in _state["errors"]:
        raise OSError(_state["errors"][isa])
    try:
        if isa != "generic" and isa not in cpu_isas():
            raise OSError(f"this CPU cannot run the {isa} build ({_REQUIRES[isa]})")
        lib = ctypes.CDLL(str(_compile(isa)))
        _declare(lib)
        if lib.dsvl2_build() != ISAS[::-1].index(isa):
            raise OSError(f"{SOURCE.name} built for {isa} reports build {lib.dsvl2_build()} "
                          "(the compiler ignored the flags?)")
    except OSError as e:
        _state["errors"][isa] = str(e)
        raise
    _state["libs"][isa] = lib
    return lib


_REQUIRES = {"avx512": "AVX512F/BW/VL, AVX512-VNNI and AVX512-BF16", "avx2": "AVX2, FMA and F16C", "generic": ""}


def cpu_isas() -> tuple[str, ...]:
    """The builds this CPU runs, best first (``generic`` always; compiles the generic build to ask the CPU)."""
    features = _load("generic").dsvl2_cpu_features()
    return tuple(isa for isa, bit in (("avx512", 2), ("avx2", 1)) if features & bit) + ("generic",)


def host_isa() -> tuple[str | None, str]:
    """The build the kernels use here and why: ``$DSVL2_CPU_ISA`` if set, else the best the CPU runs;
    (None, reason) where no build can run (no C compiler, an unknown or unsupported forced ISA)."""
    forced = os.environ.get(ISA_ENV, "").strip().lower()
    try:
        if forced:
            if forced not in ISAS:
                return None, f"${ISA_ENV}={forced!r} is not one of {list(ISAS)}"
            _load(forced)
            return forced, f"forced by ${ISA_ENV}"
        isas = cpu_isas()
        _load(isas[0])
        return isas[0], "the best build this CPU runs" + ("" if isas[0] == "avx512" else " (no " + " / ".join(
            _REQUIRES[i] for i in ISAS[:ISAS.index(isas[0])]) + ")")
    except OSError as e:
        return None, str(e)


def load(isa: str) -> ctypes.CDLL:
    """The ``isa`` build, compiled on first use; ``InputError`` saying why where it cannot run."""
    try:
        return _load(isa)
    except OSError as e:
        raise InputError(f"CPU kernels ({isa}) unavailable: {e}") from None


def default_isa() -> str:
    """The build :func:`host_isa` picks (``InputError`` where none can run): for calls without a plan."""
    isa, why = host_isa()
    if isa is None:
        raise InputError(f"CPU kernels unavailable: {why}")
    return isa


def available() -> bool:
    """Whether a build of the kernels can run here (compiles it on the first call)."""
    return host_isa()[0] is not None


def usable(isa: str | None, x: torch.Tensor, *weights: torch.Tensor) -> bool:
    """Whether activations ``x`` with ``weights`` take the ``isa`` kernels: a build chosen (a plan's
    ``kernels``), all bf16 on CPU, no autograd."""
    return (isa is not None and all(t.dtype == torch.bfloat16 and t.device.type == "cpu" for t in (x, *weights))
            and not (torch.is_grad_enabled() and (x.requires_grad or any(w.requires_grad for w in weights))))


def usable_int8(isa: str | None, x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> bool:
    """Whether bf16 activations ``x`` with int8 weights ``q`` and bf16 ``scale`` take the int8 kernels."""
    return usable(isa, x, scale) and q.dtype == torch.int8 and q.device.type == "cpu"


def gemv(weight: torch.Tensor, x: torch.Tensor, isa: str | None = None) -> torch.Tensor:
    """weight (O, I) bf16 with unit column stride, x (I,) bf16 -> (O,) bf16 (``isa``: the build, default
    the host's)."""
    lib = load(isa or default_isa())
    o, i = weight.shape
    assert weight.stride(1) == 1 and x.numel() == i, (weight.shape, weight.stride(), x.shape)
    x = x.contiguous()
    y = torch.empty(o, dtype=torch.bfloat16)
    lib.dsvl2_gemv_bf16(weight.data_ptr(), o, i, weight.stride(0), x.data_ptr(), y.data_ptr())
    return y


def moe(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, idx: torch.Tensor,
        weight: torch.Tensor, isa: str | None = None,
        shared: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Routed experts for x (T, D) bf16: gate/up (E, I, D), down (E, D, I), idx (T, K), weight (T, K) fp32.
    ``shared``: the layer's shared-experts MLP (gate, up (Is, D), down (D, Is)), computed in the same call
    and added as :class:`~dsvl2.model.moe.MoE` adds it."""
    lib = load(isa or default_isa())
    t, d = x.shape
    i = gate.shape[1]
    k = idx.shape[1]
    x, gate, up, down = x.contiguous(), gate.contiguous(), up.contiguous(), down.contiguous()
    idx = idx.to(torch.int64).contiguous()
    weight = weight.to(torch.float32).contiguous()
    h = torch.empty(t * k * i, dtype=torch.bfloat16)
    y = torch.empty(t * k * d, dtype=torch.float32)
    out = torch.empty(t, d, dtype=torch.bfloat16)
    sg, su, sd = (s.contiguous() for s in shared) if shared is not None else (None, None, None)
    i_s = sg.shape[0] if sg is not None else 0
    hs = torch.empty(t * i_s, dtype=torch.bfloat16)
    ys = torch.empty(t * d if sg is not None else 0, dtype=torch.float32)
    lib.dsvl2_moe_bf16(x.data_ptr(), t, d, gate.data_ptr(), up.data_ptr(), down.data_ptr(), i,
                       idx.data_ptr(), weight.data_ptr(), k, h.data_ptr(), y.data_ptr(), out.data_ptr(),
                       *((sg.data_ptr(), su.data_ptr(), sd.data_ptr()) if sg is not None else (None, None, None)),
                       i_s, hs.data_ptr(), ys.data_ptr())
    return out


def _group(q: torch.Tensor, scale: torch.Tensor) -> int:
    """0 for int8 (one scale per row), else the int4 group size (q packed two to a byte, scales per group)."""
    if q.dtype == torch.int8:
        return 0
    group = 2 * q.shape[-1] // scale.shape[-1]
    assert q.dtype == torch.uint8 and 2 * q.shape[-1] == group * scale.shape[-1] and group % 2 == 0 and group <= 256
    return group


def gemm_int8(q: torch.Tensor, scale: torch.Tensor, x: torch.Tensor, isa: str | None = None,
              fp32: bool = False) -> torch.Tensor:
    """x (T, I) bf16 rows (decode batches: T <= MOE_MAX_TOKENS) -> (T, O) bf16, for int8 q (O, I) with row
    scales (O,) bf16, or int4 q (O, I / 2) uint8 (quant.quantize_int4's packing) with scales (O, I / group).
    ``fp32``: the sums before their bf16 rounding (tests hold them to the exact math)."""
    o, i = q.shape[0], x.shape[1]
    t = x.shape[0]
    group = _group(q, scale)
    assert q.stride(1) == 1 and scale.shape[0] == o and (q.shape[1] == i or 2 * q.shape[1] == i), (q.shape, x.shape)
    y = torch.empty(t, o, dtype=torch.float32 if fp32 else torch.bfloat16)
    lib = load(isa or default_isa())
    fn = lib.dsvl2_gemm_q_f32 if fp32 else lib.dsvl2_gemm_int8
    fn(q.data_ptr(), o, i, q.stride(0), scale.contiguous().data_ptr(), x.contiguous().data_ptr(), t, y.data_ptr(),
       group)
    return y


def moe_int8(x: torch.Tensor, gate: tuple[torch.Tensor, torch.Tensor], up: tuple[torch.Tensor, torch.Tensor],
             down: tuple[torch.Tensor, torch.Tensor], idx: torch.Tensor, weight: torch.Tensor,
             isa: str | None = None, shared: list[tuple[torch.Tensor, torch.Tensor]] | None = None) -> torch.Tensor:
    """:func:`moe` with quantized experts: each projection a pair (q, scale) as :func:`gemm_int8`'s, stacked
    over experts: int8 (E, O, I) with (E, O), or int4 (E, O, I / 2) with (E, O, I / group). ``shared``: the
    shared-experts MLP's (q, scale) of gate, up, down (2-D, quantized as the experts), added as in :func:`moe`."""
    t, d = x.shape
    i = gate[0].shape[1]
    k = idx.shape[1]
    group, group_down = _group(*gate), _group(*down)
    (gq, gs), (uq, us), (dq, ds) = ((a.contiguous(), b.contiguous()) for a, b in (gate, up, down))
    x = x.contiguous()
    idx = idx.to(torch.int64).contiguous()
    weight = weight.to(torch.float32).contiguous()
    h = torch.empty(t * k * i, dtype=torch.float32)
    y = torch.empty(t * k * d, dtype=torch.float32)
    out = torch.empty(t, d, dtype=torch.bfloat16)
    sp: list[int | None] = [None] * 6
    i_s = group_sdown = 0
    if shared is not None:
        pairs = [(q.contiguous(), s.contiguous()) for q, s in shared]
        assert _group(*pairs[0]) == group and pairs[0][0].dtype == gq.dtype, "shared experts quantized as the routed"
        sp = [a.data_ptr() for pair in pairs for a in pair]
        i_s, group_sdown = pairs[0][1].shape[0], _group(*pairs[2])
    hs = torch.empty(t * i_s, dtype=torch.float32)
    ys = torch.empty(t * d if shared is not None else 0, dtype=torch.float32)
    load(isa or default_isa()).dsvl2_moe_int8(x.data_ptr(), t, d, gq.data_ptr(), gs.data_ptr(), uq.data_ptr(),
                                              us.data_ptr(), dq.data_ptr(), ds.data_ptr(), i, idx.data_ptr(),
                                              weight.data_ptr(), k, h.data_ptr(), y.data_ptr(), out.data_ptr(), group,
                                              group_down, *sp, i_s, group_sdown, hs.data_ptr(), ys.data_ptr())
    return out


def _weight(layer: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """(weight, scales or None) of a bias-free linear the kernels can read (bf16, int8 with row scales, int4
    with group scales), else None."""
    q = getattr(layer, "weight_int8", None)
    if q is None:
        q = getattr(layer, "weight_int4", None)
    if q is not None:
        scale = layer.weight_scale
        ok = q.is_contiguous() and scale.dtype == torch.bfloat16 and scale.is_contiguous()
        return (q, scale) if ok else None
    w = getattr(layer, "weight", None)
    if (type(layer) is torch.nn.Linear and layer.bias is None and w.dtype == torch.bfloat16 and w.is_contiguous()
            and not (torch.is_grad_enabled() and w.requires_grad)):
        return w, None
    return None


def _weights(module: torch.nn.Module, names: tuple[str, ...]) -> tuple[list[int | None], int] | None:
    """Data pointers ``[w0, scale0, w1, scale1, ...]`` (scale None for bf16) of the named linears and their
    int4 group (0: bf16 or int8), or None if one of them cannot be read by the kernels or they mix int8
    and int4 or two group sizes (the C step takes one group for them)."""
    ptrs: list[int | None] = []
    groups = set()
    for name in names:
        found = _weight(getattr(module, name))
        if found is None:
            return None
        w, scale = found
        ptrs += [w.data_ptr(), None if scale is None else scale.data_ptr()]
        if scale is not None:
            groups.add(_group(w, scale))
    if len(groups) > 1:
        return None
    return ptrs, groups.pop() if groups else 0


def mha_decode(attention: torch.nn.Module, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               cache: Any) -> torch.Tensor | None:
    """One batch-1 decode step of plain multi-head attention in one call, or None where the kernels do not
    apply: projections, RoPE, the cache write at ``cache.length``, attention over positions 0..length,
    output projection. ``cache`` is the model's ``KVCache``; x (1, 1, D) -> (1, 1, D) bf16."""
    isa = attention.plan.kernels
    k_buf, v_buf = cache.k[attention.layer], cache.v[attention.layer]  # (1, H, max_len, hd)
    if not (usable(isa, x, k_buf, cos) and x.shape[:2] == (1, 1) and k_buf.shape[0] == 1 and k_buf.is_contiguous()
            and attention.head_dim <= 256):
        return None
    found = _weights(attention, ("q_proj", "k_proj", "v_proj", "o_proj"))
    if found is None:
        return None
    ptrs, group = found
    cache.check_room(1)
    d = x.shape[-1]
    _, h, max_len, hd = k_buf.shape
    x, cos, sin = x.contiguous(), cos.contiguous(), sin.contiguous()
    out = torch.empty(1, 1, d, dtype=torch.bfloat16)
    load(isa).dsvl2_mha_decode(x.data_ptr(), d, h, hd, *ptrs, cos.data_ptr(), sin.data_ptr(),
                            k_buf.data_ptr(), v_buf.data_ptr(), max_len, cache.length, float(attention.scale_div),
                            out.data_ptr(), group)
    return out


_ONE_SLOT = (torch.zeros(1, 1, dtype=torch.int64), torch.ones(1, 1))  # expert 0 with weight 1: a plain MLP


def mlp(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """A SwiGLU MLP (``gate_proj``, ``up_proj``, ``down_proj``) on one row ``x`` (..., D) as one kernel call,
    or None where the kernels do not apply. It is the fused-experts kernel with one expert of weight 1,
    whose rounding points are the MLP's (each projection, SiLU and the product rounded to bf16)."""
    isa = module.plan.kernels
    if x.numel() != x.shape[-1] or not usable(isa, x):
        return None
    weights = [_weight(getattr(module, n)) for n in ("gate_proj", "up_proj", "down_proj")]
    if any(w is None for w in weights):
        return None
    row = x.reshape(1, -1)
    if all(s is None for _, s in weights):
        out = moe(row, *(w[None] for w, _ in weights), *_ONE_SLOT, isa=isa)
    elif all(s is not None for _, s in weights) and len({w.dtype for w, _ in weights}) == 1:  # int8 or int4
        out = moe_int8(row, *((w[None], s[None]) for w, s in weights), *_ONE_SLOT, isa=isa)  # type: ignore[index]
    else:
        return None
    return out.view(x.shape)


def moe_layer(layer: torch.nn.Module, x: torch.Tensor, idx: torch.Tensor, weight: torch.Tensor) -> torch.Tensor | None:
    """The routed experts and the shared-experts MLP of one :class:`~dsvl2.model.moe.MoE` layer for decode
    rows x (T, D) bf16 in one call (one parallel region instead of two), or None where it does not apply
    (the caller then runs them apart): bf16 weights, or int8 / int4 ones for both (:func:`moe_int8`); not
    without shared experts, in training, with LoRA."""
    experts, shared = layer.experts, layer.shared_experts
    isa = experts.plan.kernels
    if (shared is None or x.shape[0] > MOE_MAX_TOKENS or not usable(isa, x, experts.gate_proj)
            or parametrize.is_parametrized(experts)):
        return None
    weights = [_weight(getattr(shared, n)) for n in ("gate_proj", "up_proj", "down_proj")]
    if any(w is None for w in weights):
        return None
    pairs = getattr(experts, "pairs", None)  # quantized experts (quant.Int8Experts / Int4Experts)
    if pairs is None:
        if any(s is not None for _, s in weights):
            return None
        return moe(x, experts.gate_proj, experts.up_proj, experts.down_proj, idx, weight, isa,
                   shared=tuple(w for w, _ in weights))  # type: ignore[arg-type]
    routed = pairs()
    q0, s0 = routed[0]
    if (any(s is None or q.dtype != q0.dtype for q, s in weights) or q0.device.type != "cpu"
            or not usable(isa, x, s0) or _group(*weights[0]) != _group(q0, s0)):  # type: ignore[arg-type]
        return None
    return moe_int8(x, *routed, idx, weight, isa, shared=weights)  # type: ignore[arg-type]


def mla_decode(attention: torch.nn.Module, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               cache: Any) -> torch.Tensor | None:
    """One batch-1 decode step of MLA in the absorbed form in one call, or None where the kernels do not
    apply: projections, latent norm, RoPE, the cache write at ``cache.length``, attention over the latents,
    output projection. ``cache`` is the model's ``LatentCache``; x (1, 1, D) -> (1, 1, D) bf16."""
    latent, rope_key = cache.latent[attention.layer], cache.rope_key[attention.layer]  # (1, max_len, r / rope)
    isa = attention.plan.kernels
    kvb, norm = attention.kv_b_proj.weight, attention.kv_a_layernorm
    if not (usable(isa, x, latent, cos, kvb, norm.weight) and x.shape[:2] == (1, 1) and latent.shape[0] == 1
            and latent.is_contiguous() and type(attention.kv_b_proj) is torch.nn.Linear and kvb.is_contiguous()
            and attention.rope <= 256):
        return None
    found, found_o = _weights(attention, ("q_proj", "kv_a_proj_with_mqa")), _weights(attention, ("o_proj",))
    if found is None or found_o is None:
        return None
    ptrs, group = found
    ptrs_o, group_o = found_o
    cache.check_room(1)
    d = x.shape[-1]
    x, cos, sin = x.contiguous(), cos.contiguous(), sin.contiguous()
    out = torch.empty(1, 1, d, dtype=torch.bfloat16)
    load(isa).dsvl2_mla_decode(x.data_ptr(), d, attention.heads, attention.nope, attention.rope,
                            attention.v_dim, attention.rank, *ptrs, norm.weight.data_ptr(), float(norm.eps),
                            kvb.data_ptr(), *ptrs_o, cos.data_ptr(), sin.data_ptr(), latent.data_ptr(),
                            rope_key.data_ptr(), cache.length, float(attention.scale), out.data_ptr(), group, group_o)
    return out


def rmsnorm(norm: torch.nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """:class:`~dsvl2.model.layers.RMSNorm` of up to ``MOE_MAX_TOKENS`` bf16 rows in one call, or None."""
    n = x.shape[-1]
    rows = x.numel() // n if n else 0
    isa = norm.plan.kernels
    if not (0 < rows <= MOE_MAX_TOKENS and usable(isa, x, norm.weight) and norm.weight.is_contiguous()):
        return None
    x = x.contiguous()
    y = torch.empty_like(x)
    load(isa).dsvl2_rmsnorm_bf16(x.data_ptr(), rows, n, norm.weight.data_ptr(), float(norm.eps), y.data_ptr())
    return y


def router(gate: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """:class:`~dsvl2.model.moe.Router` for one bf16 row ``x`` (1, D) in one call: (idx (1, K) int64,
    weight (1, K) fp32, scores (1, E) fp32), the top K in descending order; None where it does not apply
    (several rows, grouped routing)."""
    isa = gate.plan.kernels
    if x.shape[0] != 1 or gate.n_group != 1 or not usable(isa, x, gate.weight) or not gate.weight.is_contiguous():
        return None
    e, d = gate.weight.shape
    k = gate.top_k
    bias = gate.e_score_correction_bias.float().contiguous() if gate.noaux else None
    x = x.contiguous()
    idx = torch.empty(1, k, dtype=torch.int64)
    weight = torch.empty(1, k, dtype=torch.float32)
    scores = torch.empty(1, e, dtype=torch.float32)
    load(isa).dsvl2_router(x.data_ptr(), d, gate.weight.data_ptr(), e, k, int(gate.noaux),
                        None if bias is None else bias.data_ptr(), int(gate.norm_topk_prob), float(gate.scaling),
                        idx.data_ptr(), weight.data_ptr(), scores.data_ptr())
    return idx, weight, scores


def gelu_tanh(x: torch.Tensor, isa: str | None) -> torch.Tensor | None:
    """``F.gelu(x, approximate="tanh")`` of a contiguous bf16 tensor, in place (the ViT's MLP hidden), or None.

    Correctly rounded to bf16 (tested against fp64) and equal to torch's result except where torch's tanh
    form cancels (x < -3), where torch is the less accurate one. torch's bf16 tanh-GELU runs at ~2 ns a
    value on this CPU, 4.5x its erf GELU: 11 % of the vision tower's time in a profile."""
    if not (usable(isa, x) and x.is_contiguous()):
        return None
    load(isa).dsvl2_gelu_tanh_bf16(x.data_ptr(), x.numel(), x.data_ptr())
    return x
