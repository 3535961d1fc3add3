"""The builds of dsvl2's CPU kernels: which one the CPU gets, the arm64 build under qemu, and int4 (the
quantized kernels' group-wise form). Like tests/test_cpu_kernels.py, run by ``make test`` on the host's
build and again with ``DSVL2_CPU_ISA=avx2`` and ``generic``."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from dsvl2.model import cpu_kernels, quant
from dsvl2.model.moe import dispatch
from dsvl2.model.plan import EXACT, Plan, apply

needs_kernels = pytest.mark.skipif(not cpu_kernels.available(), reason="no C compiler to build the kernels")
ISA = cpu_kernels.host_isa()[0]
FAST = Plan(kernels=ISA) if ISA else EXACT


@needs_kernels
def test_the_build_is_the_best_the_cpu_runs_unless_forced(monkeypatch):

    isas = cpu_kernels.cpu_isas()
    assert isas[-1] == "generic" and set(isas) <= set(cpu_kernels.ISAS)
    info = Path("/proc/cpuinfo")
    if info.exists():  # independent truth: the kernel's view of the CPU
        flags = set(next((ln for ln in info.read_text().splitlines() if ln.startswith("flags")), "").split())
        assert ("avx2" in isas) == ({"avx2", "fma", "f16c"} <= flags)
        assert ("avx512" in isas) == ({"avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16"} <= flags)
    monkeypatch.delenv(cpu_kernels.ISA_ENV, raising=False)
    assert cpu_kernels.host_isa()[0] == isas[0]
    monkeypatch.setenv(cpu_kernels.ISA_ENV, "generic")
    assert cpu_kernels.host_isa() == ("generic", "forced by $DSVL2_CPU_ISA")
    monkeypatch.setenv(cpu_kernels.ISA_ENV, "sse9")
    isa, why = cpu_kernels.host_isa()
    assert isa is None and "'sse9' is not one of" in why


ARM_TOOLS = ("aarch64-linux-gnu-gcc", "qemu-aarch64")


@pytest.mark.skipif(not all(shutil.which(t) for t in ARM_TOOLS) or not shutil.which("gcc"),
                    reason="no arm64 cross compiler and qemu-user (Debian: gcc-aarch64-linux-gnu qemu-user)")
def test_the_generic_build_on_arm64_computes_what_the_host_builds_do(tmp_path):
    """The plain-C build compiles for arm64 and, run under qemu, gives the host's outputs (which the tests
    above hold to torch) on GEMV, int8 and int4 GEMV, GELU, RMSNorm and the fused experts."""
    import os
    import subprocess

    driver = Path(__file__).with_name("csrc") / "kernels_driver.c"
    outputs = {}
    for name, cc, run in (("host", "gcc", []),
                          ("arm64", "aarch64-linux-gnu-gcc", ["qemu-aarch64", "-L", "/usr/aarch64-linux-gnu"])):
        exe = tmp_path / name
        subprocess.run([cc, "-O3", "-fopenmp", str(driver), str(cpu_kernels.SOURCE), "-o", str(exe), "-lm"],
                       check=True, capture_output=True)
        text = subprocess.run([*run, str(exe)], check=True, capture_output=True, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": "2"}).stdout
        outputs[name] = [ln.split() for ln in text.splitlines()[1:]]
    host, arm = outputs["host"], outputs["arm64"]
    assert len(host) == len(arm) > 3000 and [k for k, _ in host] == [k for k, _ in arm]
    for (kernel, a), (_, b) in zip(host, arm):  # fp32 sums in other orders, rounded to bf16: within one step
        assert abs(float(a) - float(b)) <= 2 ** -7 * max(abs(float(a)), 1e-3), kernel


@needs_kernels
@pytest.mark.parametrize("shape", [(37, 1280), (5, 40), (64, 896)])
def test_int4_gemm_equals_the_exact_product_of_the_dequantized_weights(shape):
    o, i = shape
    g = torch.Generator().manual_seed(o + i)
    q, scale = quant.quantize_int4(torch.randn(o, i, generator=g).bfloat16())
    w = quant.dequantize_int4(q, scale.double())  # (O, I): q * s exactly
    x = torch.randn(3, i, generator=g).bfloat16()
    exact = x.double() @ w.T
    y = cpu_kernels.gemm_int8(q, scale, x)  # the quantized GEMM takes int4 too (group from the shapes)
    assert y.dtype == torch.bfloat16 and y.shape == (3, o)
    # x quantized to int8 per weight group (error <= max|x_g| / 254 per element), one bf16 rounding
    group = i // scale.shape[1]
    xmax = x.double().view(3, -1, group).abs().amax(-1)  # (3, G)
    wsum = w.abs().view(o, -1, group).sum(-1)  # (O, G)
    bound = 2 ** -8 * exact.abs() + (xmax @ wsum.T) / 254 * 1.01
    assert ((y.double() - exact).abs() <= bound + 1e-6).all()


def _q8(x: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernels' int8 activations, computed here in the same fp32 steps: per group s = max|x| / 127 (1 for
    an all-zero group), q = round-half-even(x * (1 / s)). Returns q (T, G, group) and s (T, G), as float64."""
    xf = x.float().view(x.shape[0], -1, group)
    m = xf.abs().amax(-1)
    s = torch.where(m > 0, m / 127, torch.ones_like(m))
    q = torch.round(xf * (1 / s).unsqueeze(-1)).clamp(-127, 127)
    return q.double(), s.double()


@needs_kernels
@pytest.mark.parametrize("shape", [(37, 1280), (5, 40), (6, 64), (9, 192), (64, 896), (3, 1088)])
def test_int4_dot_is_the_exact_q4_times_q8_math_on_every_build(shape):
    """Per group the exact sum of (nibble - 8) * int8 activation, times weight scale * activation scale,
    summed in fp32: every build the host runs (group 64 takes the intrinsics, smaller groups the plain C)
    agrees with that math done in float64 here to the fp32 rounding of its sums."""
    o, i = shape
    g = torch.Generator().manual_seed(o * i)
    q, scale = quant.quantize_int4(torch.randn(o, i, generator=g).bfloat16())
    group = i // scale.shape[1]
    x = torch.randn(3, i, generator=g).bfloat16()
    x[1, :group] = 0  # an all-zero activation group
    x[2] *= torch.linspace(0.01, 100, i).bfloat16()  # groups of very different scales
    w = quant.dequantize_int4(q, torch.ones_like(scale, dtype=torch.float64)).view(o, -1, group)  # nibble - 8
    xq, xs = _q8(x, group)
    isum = torch.einsum("ogj,tgj->tog", w, xq)  # (T, O, G) exact integers
    terms = scale.double()[None] * xs[:, None] * isum
    exact, size = terms.sum(-1), terms.abs().sum(-1)
    ng = i // group
    for isa in cpu_kernels.cpu_isas():
        y = cpu_kernels.gemm_int8(q, scale, x, isa, fp32=True).double()
        # each term rounded twice (scale product, fma), then ng fp32 additions in some order
        assert ((y - exact).abs() <= (ng + 3) * 2 ** -24 * size + 1e-30).all(), isa
        assert torch.equal(cpu_kernels.gemm_int8(q, scale, x, isa), y.float().bfloat16()), isa  # one bf16 rounding


@needs_kernels
@pytest.mark.parametrize("group", [64, 8])
def test_int4_extreme_nibbles_and_activations_sum_exactly(group):
    """Nibbles 0 and 15 (weights -8 and 7) against activations at +-127 (the largest products the byte
    instructions see: unsigned nibble times signed int8), on every build."""
    i = 4 * group
    nibbles = torch.tensor([[0, 0], [15, 15], [0, 15], [15, 0], [8, 3]], dtype=torch.uint8)  # (lo, hi) per row
    q = (nibbles[:, 0] | (nibbles[:, 1] << 4))[:, None].expand(5, i // 2).contiguous()
    scale = torch.ones(5, i // group).bfloat16()
    x = torch.ones(2, i).bfloat16()
    x[1, ::2] = -1  # alternating signs
    v = torch.cat([nibbles[:, :1].expand(5, group // 2), nibbles[:, 1:].expand(5, group // 2)], 1).repeat(1, 4)
    exact = (v.double() - 8) @ x.double().T  # activations +-1 quantize to +-127 with scale 1/127: exact
    for isa in cpu_kernels.cpu_isas():
        y = cpu_kernels.gemm_int8(q, scale, x, isa, fp32=True)
        torch.testing.assert_close(y.double(), exact.T, rtol=1e-6, atol=1e-5, msg=isa)


@needs_kernels
@pytest.mark.parametrize("tokens", [1, 3])
def test_int4_fused_experts_equal_the_torch_path(tokens):
    g = torch.Generator().manual_seed(tokens)
    qe = quant.Int4Experts(8, 64, 40, torch.bfloat16, "cpu")
    for name in qe.NAMES:
        w = torch.randn(getattr(qe, f"{name}_int4").shape[:-1] + (2 * getattr(qe, f"{name}_int4").shape[-1],),
                        generator=g).bfloat16() * 0.1
        q, s = quant.quantize_int4(w)
        getattr(qe, f"{name}_int4").copy_(q)
        getattr(qe, f"{name}_scale").copy_(s)
    x = torch.randn(tokens, 64, generator=g).bfloat16()
    idx = torch.stack([torch.randperm(8, generator=g)[:6] for _ in range(tokens)])
    weight = torch.rand(tokens, 6, generator=g)
    with torch.no_grad():
        plain = qe(x, idx, weight)  # exact plan: dequantized weights, one expert at a time
        fused = apply(qe, FAST)(x, idx, weight)
        unfused = dispatch(x, idx, weight, 8, qe._per_expert)  # the kernel plan's per-projection GEMVs
    # the same int8 activations, projections and rounding points as one GEMV per projection (SiLU: C's or torch's)
    torch.testing.assert_close(fused.float(), unfused.float(), rtol=2 ** -7, atol=1e-3 * float(plain.abs().max()))
    # against exact activations: int8 per group (error <= 1/254 of a group's largest) in both products
    torch.testing.assert_close(fused.float(), plain.float(), rtol=2 ** -6, atol=2e-2 * float(plain.abs().max()))
