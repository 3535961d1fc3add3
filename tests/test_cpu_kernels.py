"""dsvl2's CPU decode kernels (dsvl2/model/cpu_kernels.py) against torch's reference math.

Each test runs the build the host CPU selects (avx512 where AVX512-BF16 is present, else avx2, else
generic); CI runs this file again with ``DSVL2_CPU_ISA=avx2`` and ``generic`` so that the portable
builds are exercised on any machine. Only a missing C compiler skips them."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dsvl2.generation.generate import GenerateArgs, generate
from dsvl2.model import cpu_kernels, quant
from dsvl2.model.moe import Experts
from dsvl2.model.plan import EXACT, Plan, apply
from toy import toy_batch, toy_model

needs_kernels = pytest.mark.skipif(not cpu_kernels.available(), reason="no C compiler to build the kernels")
ISA = cpu_kernels.host_isa()[0]  # the build this host runs (or $DSVL2_CPU_ISA's)
FAST = Plan(kernels=ISA) if ISA else EXACT  # the kernels only (no SDPA), so the torch side is the reference


@needs_kernels
@pytest.mark.parametrize("shape", [(64, 64), (37, 40), (5, 33), (896, 1280), (3, 1)])
def test_gemv_equals_fp32_product_rounded_to_bf16(shape):
    o, i = shape
    g = torch.Generator().manual_seed(o * i)
    w, x = torch.randn(o, i, generator=g).bfloat16(), torch.randn(i, generator=g).bfloat16()
    ref = (w.double() @ x.double()).float()
    y = cpu_kernels.gemv(w, x)
    assert y.dtype == torch.bfloat16 and y.shape == (o,)
    # fp32 accumulation in another order, then one bf16 rounding: within one bf16 ulp of the exact sum
    torch.testing.assert_close(y.float(), ref, rtol=2 ** -7, atol=1e-5 * i)


@needs_kernels
def test_gemv_reads_rows_with_a_stride():
    g = torch.Generator().manual_seed(1)
    big = torch.randn(48, 100, generator=g).bfloat16()
    w, x = big[:, 10:74], torch.randn(64, generator=g).bfloat16()  # row stride 100, unit column stride
    assert torch.equal(cpu_kernels.gemv(w, x), cpu_kernels.gemv(w.contiguous(), x))


@needs_kernels
@pytest.mark.parametrize("k", [2, 6])
@pytest.mark.parametrize("tokens", [1, 3])
def test_fused_experts_equal_the_grouped_path(k, tokens):
    g = torch.Generator().manual_seed(k + tokens)
    ex = Experts(8, 64, 40)
    for p in ex.parameters():
        p.data = (torch.randn(p.shape, generator=g) * 0.1).bfloat16()
    x = torch.randn(tokens, 64, generator=g).bfloat16()
    idx = torch.stack([torch.randperm(8, generator=g)[:k] for _ in range(tokens)])
    weight = torch.rand(tokens, k, generator=g)
    with torch.no_grad():
        fused = cpu_kernels.moe(x, ex.gate_proj, ex.up_proj, ex.down_proj, idx, weight)
        plain = ex(x, idx, weight)  # kernels off: the grouped GEMMs
    torch.testing.assert_close(fused.float(), plain.float(), rtol=2 ** -6, atol=2e-3)


@needs_kernels
@pytest.mark.parametrize("mode", ["int8", "int4"])
@pytest.mark.parametrize("tokens", [1, 3])
def test_quantized_shared_experts_in_the_routed_call_equal_the_two_calls(tokens, mode):
    """The same for int8 / int4 layers: routed experts (moe_int8) plus the shared MLP (mlp), bit for bit."""
    from dsvl2.model.moe import MoE

    model = quant.quantize_model_(toy_model("mla", seed=6, dtype=torch.bfloat16), mode)
    layer = next(m for m in model.modules() if isinstance(m, MoE) and m.shared_experts is not None)
    apply(model, FAST)
    x = torch.randn(tokens, layer.cfg.hidden_size, generator=torch.Generator().manual_seed(tokens)).bfloat16()
    with torch.no_grad():
        idx, weight, _ = layer.gate(x)
        one = cpu_kernels.moe_layer(layer, x, idx, weight)
        routed = cpu_kernels.moe_int8(x, *layer.experts.pairs(), idx, weight)
        shared = torch.stack([cpu_kernels.mlp(layer.shared_experts, row) for row in x])
        layer.training = True  # the module's own path skips the fused call when training
        apart = layer(x[None])[0]
    assert one is not None and torch.equal(one, routed + shared)
    if tokens == 1:
        assert torch.equal(one, apart)


@needs_kernels
@pytest.mark.parametrize("tokens", [1, 3])
def test_shared_experts_in_the_routed_call_equal_the_two_calls(tokens):
    """moe_layer's one call (routed + shared experts) = the routed call plus the MLP call, added in bf16 as
    MoE.forward adds them: bit for bit (the same rows, the same rounding points)."""
    from dsvl2.model.layers import MLP
    from dsvl2.model.moe import MoE

    model = toy_model("mla", seed=6, dtype=torch.bfloat16)
    layer = next(m for m in model.modules() if isinstance(m, MoE) and m.shared_experts is not None)
    apply(model, FAST)
    g = torch.Generator().manual_seed(tokens)
    x = torch.randn(tokens, layer.cfg.hidden_size, generator=g).bfloat16()
    with torch.no_grad():
        idx, weight, _ = layer.gate(x)
        one = cpu_kernels.moe_layer(layer, x, idx, weight)
        ex, sh = layer.experts, layer.shared_experts
        routed = cpu_kernels.moe(x, ex.gate_proj, ex.up_proj, ex.down_proj, idx, weight)
        shared = torch.stack([cpu_kernels.mlp(sh, row) for row in x])
        layer.training = True  # the module's own path skips the fused call when training
        apart = layer(x[None])[0]
    assert isinstance(sh, MLP) and torch.equal(one, routed + shared)
    if tokens == 1:  # the module's own path runs the same two kernels (several rows: torch's MLP, bf16-close)
        assert torch.equal(one, apart)
    torch.testing.assert_close(one.float(), apart.float(), rtol=2 ** -6, atol=2e-3)


@needs_kernels
def test_not_used_with_autograd():
    x = torch.randn(1, 8).bfloat16().requires_grad_()
    assert not cpu_kernels.usable(ISA, x)
    with torch.no_grad():
        assert cpu_kernels.usable(ISA, x.detach())
        assert not cpu_kernels.usable(None, x.detach())  # no build chosen: the exact plan
    assert not cpu_kernels.usable(ISA, x.detach().float())
    with torch.no_grad():
        assert not cpu_kernels.usable(ISA, x.detach(), torch.zeros(2, 8))  # fp32 weights (autocast): torch path


@pytest.mark.parametrize(("variant", "mode", "kernels"), [
    ("mla", None, ("gemv", "moe", "mla_decode")),
    ("mha", None, ("gemv", "moe", "mha_decode")),
    ("mla", "int8", ("gemm_int8", "moe_int8", "mla_decode")),
    ("mha", "int4", ("gemm_int8", "moe_int8", "mha_decode", "mlp")),
])
@needs_kernels
def test_greedy_generation_is_unchanged(variant, mode, kernels, monkeypatch):
    calls = dict.fromkeys(kernels, 0)
    for name in calls:
        def counted(*args, _f=getattr(cpu_kernels, name), _n=name, **kw):
            calls[_n] += 1
            return _f(*args, **kw)
        monkeypatch.setattr(cpu_kernels, name, counted)
    model = toy_model(variant, seed=3, dtype=torch.bfloat16)
    if mode:
        quant.quantize_model_(model, mode)
    ids, mask, tiles, seq_mask, crop = toy_batch(model, seed=4, lengths=(20,))
    tiles = tiles.bfloat16()
    apply(model, FAST)

    def tokens():
        return [s.tokens.tolist() for s in generate(model, ids, mask, tiles, seq_mask, crop,
                                                    GenerateArgs(max_new_tokens=8), 1)]

    fast = tokens()
    assert all(calls.values()), calls  # batch-1 decode went through every kernel
    apply(model, EXACT)
    assert fast == tokens()


@needs_kernels
@pytest.mark.parametrize("shape", [(64, 64), (37, 40), (5, 33), (896, 1280), (3, 1), (9, 700)])
def test_int8_gemv_equals_the_exact_product(shape):
    o, i = shape
    g = torch.Generator().manual_seed(o + i)
    q, scale = quant.quantize_int8(torch.randn(o, i, generator=g).bfloat16())
    x = torch.randn(i, generator=g).bfloat16()
    exact = (q.double() @ x.double()) * scale.double()
    y = cpu_kernels.gemm_int8(q, scale, x[None])[0]
    assert y.dtype == torch.bfloat16 and y.shape == (o,)
    # x quantized to int16 (error <= max|x| / 65534 per element), exact int32 sums, one bf16 rounding
    bound = 2 ** -8 * exact.abs() + q.abs().double().sum(-1) * scale.double() * x.double().abs().max() / 65534
    assert ((y.double() - exact).abs() <= bound + 1e-6).all()
    if i % 16 == 0:  # torch's int8 kernel (the reference path) agrees to bf16 rounding
        ref = torch._weight_int8pack_mm(x[None], q, scale)[0]
        torch.testing.assert_close(y.float(), ref.float(), rtol=2 ** -7, atol=1e-3 * float(ref.abs().max()))


@needs_kernels
def test_int8_gemm_rows_equal_single_row_calls():
    g = torch.Generator().manual_seed(7)
    q, scale = quant.quantize_int8(torch.randn(45, 300, generator=g).bfloat16())
    x = torch.randn(5, 300, generator=g).bfloat16() * torch.tensor([1.0, 10.0, 0.01, 0.0, 3.0]).bfloat16()[:, None]
    rows = cpu_kernels.gemm_int8(q, scale, x)  # each row quantized to int16 with its own scale
    assert rows.shape == (5, 45) and torch.equal(rows[3], torch.zeros(45).bfloat16())
    for t in range(5):
        assert torch.equal(rows[t], cpu_kernels.gemm_int8(q, scale, x[t:t + 1])[0])


@needs_kernels
def test_int8_gemv_sums_long_rows_without_overflow():
    n = 16384  # every product at its largest (127 * 32767): one int32 lane would overflow after 516 of them
    q = torch.full((4, n), 127, dtype=torch.int8)
    y = cpu_kernels.gemm_int8(q, torch.ones(4).bfloat16(), torch.ones(1, n).bfloat16())[0]
    assert torch.equal(y, torch.full((4,), 127.0 * n).bfloat16())


@needs_kernels
@pytest.mark.parametrize("tokens", [1, 2])
def test_int8_fused_experts_equal_the_torch_path(tokens):
    g = torch.Generator().manual_seed(tokens)
    qe = quant.Int8Experts(8, 64, 40, torch.bfloat16, "cpu")
    for name in qe.NAMES:
        q, s = quant.quantize_int8(torch.randn(getattr(qe, f"{name}_int8").shape, generator=g).bfloat16() * 0.1)
        getattr(qe, f"{name}_int8").copy_(q)
        getattr(qe, f"{name}_scale").copy_(s)
    x = torch.randn(tokens, 64, generator=g).bfloat16()
    idx = torch.stack([torch.randperm(8, generator=g)[:6] for _ in range(tokens)])
    weight = torch.rand(tokens, 6, generator=g)
    with torch.no_grad():
        fused = cpu_kernels.moe_int8(x, (qe.gate_proj_int8, qe.gate_proj_scale), (qe.up_proj_int8, qe.up_proj_scale),
                                     (qe.down_proj_int8, qe.down_proj_scale), idx, weight)
        plain = qe(x, idx, weight)  # the exact plan (a module's default): torch._weight_int8pack_mm per expert
    torch.testing.assert_close(fused.float(), plain.float(), rtol=2 ** -6, atol=2e-3)


def _reference_plan(model: nn.Module, mode: str | None, monkeypatch: pytest.MonkeyPatch) -> None:
    """What a fused decode step is compared with: the exact plan, or for int4 (whose kernels quantize the
    activations to int8 per group, as torch's dequantized path does not) the kernel plan without the
    fused steps: one quantized GEMV per projection, torch for the rest."""
    if mode != "int4":
        apply(model, EXACT)
        return
    apply(model, FAST)
    for name in ("mha_decode", "mla_decode", "mlp"):
        monkeypatch.setattr(cpu_kernels, name, lambda *a, **k: None)


@needs_kernels
@pytest.mark.parametrize("mode", [None, "int8", "int4"])
def test_mha_decode_step_equals_the_sdpa_path(mode, monkeypatch):
    from dsvl2.model.cache import make_cache

    model = toy_model("mha", seed=5, dtype=torch.bfloat16)
    if mode:
        quant.quantize_model_(model, mode)
    lm = model.language.model
    attn, cfg = lm.layers[1].self_attn, model.cfg.language_config
    g = torch.Generator().manual_seed(9)
    caches = [make_cache(cfg, 1, 64, torch.bfloat16, "cpu") for _ in range(2)]
    for c in caches:  # 37 cached positions of random keys and values
        torch.manual_seed(1)
        c.k.copy_(torch.randn(c.k.shape)), c.v.copy_(torch.randn(c.v.shape))
        c.length = 37
    x = torch.randn(1, 1, cfg.hidden_size, generator=g).bfloat16()
    cos, sin = lm.rotary(torch.tensor([[37]]), torch.bfloat16)
    calls = []
    with torch.no_grad():
        apply(model, FAST)
        fast = attn._kernel_step(x, cos, sin, None, caches[0])
        calls.append(fast is not None)
        _reference_plan(model, mode, monkeypatch)
        ref = attn.forward_expanded(x, cos, sin, None, caches[1])
    assert calls == [True] and fast.shape == ref.shape == (1, 1, cfg.hidden_size)
    torch.testing.assert_close(fast.float(), ref.float(), rtol=2 ** -6, atol=2e-3 * float(ref.abs().max()))
    for a, b in ((caches[0].k, caches[1].k), (caches[0].v, caches[1].v)):  # the new key and value, written at 37
        torch.testing.assert_close(a[1, :, :, 37].float(), b[1, :, :, 37].float(), rtol=2 ** -6, atol=1e-2)
        assert torch.equal(a[1, :, :, :37], b[1, :, :, :37]) and torch.equal(a[1, :, :, 38:], b[1, :, :, 38:])


@needs_kernels
@pytest.mark.parametrize("mode", [None, "int8", "int4"])
def test_mla_decode_step_equals_the_absorbed_path(mode, monkeypatch):
    from dsvl2.model.cache import make_cache

    model = toy_model("mla", seed=5, dtype=torch.bfloat16)
    if mode:
        quant.quantize_model_(model, mode)
    lm, cfg = model.language.model, model.cfg.language_config
    attn = lm.layers[1].self_attn
    caches = [make_cache(cfg, 1, 64, torch.bfloat16, "cpu") for _ in range(2)]
    for c in caches:  # 37 cached positions of random latents and rotary keys
        torch.manual_seed(1)
        c.latent.copy_(torch.randn(c.latent.shape)), c.rope_key.copy_(torch.randn(c.rope_key.shape))
        c.length = 37
    x = torch.randn(1, 1, cfg.hidden_size, generator=torch.Generator().manual_seed(9)).bfloat16()
    cos, sin = lm.rotary(torch.tensor([[37]]), torch.bfloat16)
    with torch.no_grad():
        apply(model, FAST)
        fast = attn._kernel_step(x, cos, sin, None, caches[0])
        _reference_plan(model, mode, monkeypatch)
        ref = attn(x, cos, sin, None, caches[1])  # the reference's absorbed decode path
    assert fast is not None and fast.shape == ref.shape == (1, 1, cfg.hidden_size)
    # the reference's rounding points, sums in another order: bf16-close (equal on this case for bf16)
    torch.testing.assert_close(fast.float(), ref.float(), rtol=2 ** -6, atol=2e-3 * float(ref.abs().max()))
    for a, b in ((caches[0].latent, caches[1].latent), (caches[0].rope_key, caches[1].rope_key)):
        torch.testing.assert_close(a.float(), b.float(), rtol=2 ** -7, atol=1e-2)  # written at 37 only
        assert torch.equal(a[:, :, :37], b[:, :, :37]) and torch.equal(a[:, :, 38:], b[:, :, 38:])


@needs_kernels
def test_mha_decode_step_refuses_a_full_cache():
    from dsvl2.errors import InputError
    from dsvl2.model.cache import make_cache

    model = apply(toy_model("mha", seed=5, dtype=torch.bfloat16), FAST)
    lm, cfg = model.language.model, model.cfg.language_config
    cache = make_cache(cfg, 1, 8, torch.bfloat16, "cpu")
    cache.length = 8
    cos, sin = lm.rotary(torch.tensor([[8]]), torch.bfloat16)
    with torch.no_grad(), pytest.raises(InputError, match="cache full"):
        lm.layers[0].self_attn(torch.zeros(1, 1, cfg.hidden_size).bfloat16(), cos, sin, None, cache)


@needs_kernels
@pytest.mark.parametrize("mode", [None, "int8", "int4"])
def test_mlp_row_through_the_expert_kernel_equals_torch(mode, monkeypatch):
    from dsvl2.model.layers import MLP

    torch.manual_seed(2)
    block = nn.Module()
    block.mlp = MLP(192, 320).bfloat16()  # int4: groups of 64 (3 and 5 a row)
    if mode:
        for name in ("gate_proj", "up_proj", "down_proj"):
            lin = getattr(block.mlp, name)
            q, s = quant.QUANTIZERS[mode](lin.weight.detach())
            new = (quant.Int8Linear if mode == "int8" else quant.Int4Linear)(lin.out_features, lin.in_features,
                                                                             torch.bfloat16, "cpu")
            getattr(new, f"weight_{mode}").copy_(q), new.weight_scale.copy_(s)
            setattr(block.mlp, name, new)
    x = torch.randn(1, 1, 192).bfloat16()
    with torch.no_grad():
        assert cpu_kernels.mlp(apply(block, FAST).mlp, x) is not None  # the kernel applies
        assert cpu_kernels.mlp(block.mlp, torch.randn(2, 192).bfloat16()) is None  # two rows: the torch path
        fast = block.mlp(x)
        _reference_plan(block, mode, monkeypatch)
        ref = block.mlp(x)
    assert fast.shape == ref.shape == (1, 1, 192)
    torch.testing.assert_close(fast.float(), ref.float(), rtol=2 ** -6, atol=2e-3 * float(ref.abs().max()))


@needs_kernels
def test_rmsnorm_rows_equal_torch():
    from dsvl2.model.layers import RMSNorm

    g = torch.Generator().manual_seed(3)
    norm = RMSNorm(300, eps=1e-6).bfloat16()
    norm.weight.data = (torch.randn(300, generator=g) * 0.5 + 1).bfloat16()
    x = (torch.randn(3, 1, 300, generator=g) * 4).bfloat16()
    with torch.no_grad():
        fast = apply(norm, FAST)(x)
        assert cpu_kernels.rmsnorm(norm, x) is not None  # the kernel ran
        ref = apply(norm, EXACT)(x)
    # the same rounding points, the mean of squares summed in another order: equal up to rare last-bit ties
    assert (fast != ref).float().mean() < 0.01
    torch.testing.assert_close(fast.float(), ref.float(), rtol=2 ** -7, atol=0)


@needs_kernels
@pytest.mark.parametrize("variant", ["mla", "noaux"])
def test_router_row_chooses_as_torch(variant):
    model = toy_model(variant, seed=2, dtype=torch.bfloat16)
    gate = model.language.model.layers[1].mlp.gate
    g = torch.Generator().manual_seed(4)
    if gate.noaux:  # a correction bias that changes the choice (sigmoid scores + bias)
        gate.e_score_correction_bias.data = torch.randn(gate.e_score_correction_bias.shape, generator=g) * 0.1
    for _ in range(20):
        x = torch.randn(1, gate.weight.shape[1], generator=g).bfloat16()
        with torch.no_grad():
            idx, weight, scores = cpu_kernels.router(apply(gate, FAST), x)
            ref_idx, ref_weight, ref_scores = apply(gate, EXACT)(x)
            apply(gate, FAST)
        ours = dict(zip(idx[0].tolist(), weight[0].tolist()))  # slot order may differ: compare as sets
        theirs = dict(zip(ref_idx[0].tolist(), ref_weight[0].tolist()))
        assert ours.keys() == theirs.keys()
        assert all(abs(ours[e] - theirs[e]) <= 1e-6 * max(1.0, abs(theirs[e])) for e in ours)
        torch.testing.assert_close(scores, ref_scores, rtol=1e-5, atol=1e-7)
    assert cpu_kernels.router(gate, torch.zeros(2, gate.weight.shape[1]).bfloat16()) is None  # rows: torch


def test_a_missing_compiler_is_named_in_the_error(tmp_path, monkeypatch):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setenv("DSVL2_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(cpu_kernels, "_state", {"libs": {}, "errors": {}})
    from dsvl2.errors import InputError
    from dsvl2.model.plan import resolve

    with pytest.raises(InputError, match="no C compiler .*no-such-cc.* set \\$CC"):
        cpu_kernels.default_isa()
    plan = resolve("cpu", torch.bfloat16)  # the fast plan still loads, without the kernels, and says why
    assert plan.kernels is None and "no C compiler" in plan.describe()


@needs_kernels
def test_gelu_tanh_is_correctly_rounded_and_matches_torch_where_torch_is():
    x = torch.cat([torch.randn(50_000, generator=torch.Generator().manual_seed(0)) * 3,
                   torch.linspace(-12, 12, 20_001), torch.tensor([0.0, -0.0, 50.0, -50.0, 1e4, -1e4])]).bfloat16()
    xd = x.double()
    truth = xd * torch.sigmoid(2 * (2 / torch.pi) ** 0.5 * (xd + 0.044715 * xd ** 3))  # = 0.5 x (1 + tanh u)
    y = cpu_kernels.gelu_tanh(x.clone(), ISA)
    normal = truth.abs() > 1e-30
    step = torch.pow(2.0, torch.frexp(truth[normal])[1].double() - 8)  # one bf16 step at the true value
    assert ((y.double()[normal] - truth[normal]).abs() / step).max() <= 0.5 + 1e-3  # rounded once, to nearest
    assert (y.double()[~normal] - truth[~normal]).abs().max() < 1e-30
    torch_y = torch.nn.functional.gelu(x, approximate="tanh")
    # torch's tanh form cancels for x < -3 (up to hundreds of bf16 steps off); elsewhere the two agree
    assert (y == torch_y)[x >= -3].float().mean() > 0.995
    assert cpu_kernels.gelu_tanh(x.float(), ISA) is None and cpu_kernels.gelu_tanh(x[::2], ISA) is None  # fp32, strided
    assert cpu_kernels.gelu_tanh(x.clone(), None) is None  # the exact plan


@needs_kernels
def test_vision_tower_with_the_gelu_kernel_stays_bf16_close(monkeypatch):
    from dsvl2.config import VisionConfig
    from dsvl2.model.init import FIXTURE_INIT, init_params_
    from dsvl2.model.vision import VisionTower

    tower = VisionTower(VisionConfig(image_size=56, patch_size=14, width=64, layers=2, heads=4, mlp_ratio=4.0))
    init_params_(tower, 0, **FIXTURE_INIT)
    tower = tower.bfloat16().eval()
    tiles = torch.randn(3, 3, 56, 56, generator=torch.Generator().manual_seed(1)).bfloat16()
    with torch.no_grad():
        ref = tower(tiles).float()
        calls = []
        monkeypatch.setattr(cpu_kernels, "gelu_tanh",
                            lambda h, isa, f=cpu_kernels.gelu_tanh: calls.append(1) or f(h, isa))
        out = apply(tower, FAST)(tiles).float()
    assert len(calls) == 2  # one per block
    torch.testing.assert_close(out, ref, rtol=0.05, atol=0.05)
    assert (out - ref).abs().mean() < 0.01


@needs_kernels
def test_two_models_with_different_plans_do_not_interfere(monkeypatch):
    """Plans live on each model's modules: generating with a kernel-plan model and an exact one in lock-step
    changes neither (the exact one's logits bit for bit)."""
    fast_model = apply(toy_model("mla", seed=3, dtype=torch.bfloat16), FAST)
    exact_model = toy_model("mla", seed=3, dtype=torch.bfloat16)  # same weights, the default (exact) plan
    inputs = toy_batch(fast_model, seed=4, lengths=(20,))
    inputs = (*inputs[:2], inputs[2].bfloat16(), *inputs[3:])

    def steps(model):
        return generate(model, *inputs, GenerateArgs(max_new_tokens=6), 1, return_logits=True)

    alone = {id(m): [s.logits for s in steps(m)] for m in (fast_model, exact_model)}
    calls = []
    monkeypatch.setattr(cpu_kernels, "moe", lambda *a, f=cpu_kernels.moe, **k: calls.append(1) or f(*a, **k))
    together = list(zip(steps(fast_model), steps(exact_model)))
    assert calls  # the fast model's experts went through the kernel
    for i, (f, e) in enumerate(together):
        assert torch.equal(e.logits, alone[id(exact_model)][i])
        assert torch.equal(f.logits, alone[id(fast_model)][i])
    assert not torch.equal(alone[id(fast_model)][1], alone[id(exact_model)][1])  # the plans did differ
