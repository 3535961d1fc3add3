"""Fast paths equal their plain forms: grouped expert GEMMs == the per-expert loop (values and
gradients, fp32 and bf16 bit for bit: the same GEMM per expert), the column form within one bf16
rounding, and no host sync in the default MoE dispatch.

CI runs this file twice: on the host's own kernels and with torch's AVX2 kernels forced
(``ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2``), which reproduces what an AVX2-only CPU computes."""

from __future__ import annotations

import pytest
import torch

from dsvl2.model.moe import Experts, grouped_mm_supported


def _experts(dtype: torch.dtype, seed: int = 0) -> Experts:
    g = torch.Generator().manual_seed(seed)
    ex = Experts(8, 64, 32)
    for p in ex.parameters():
        p.data = (torch.randn(p.shape, generator=g) * 0.1).to(dtype)
    return ex


def _routing(n: int, k: int, e: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    idx = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(n)])  # (N, K) distinct per row
    weight = torch.rand(n, k, generator=g)
    return idx, weight


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n", [1, 3, 40])
def test_grouped_experts_equal_per_expert_loop(dtype, n):
    ex = _experts(dtype)
    x = torch.randn(n, 64, generator=torch.Generator().manual_seed(n)).to(dtype)
    idx, weight = _routing(n, 3, 8, seed=n)
    assert grouped_mm_supported(x)
    with torch.no_grad():
        fast = ex(x, idx, weight)
        plain = ex.forward_per_expert(x, idx, weight)
    assert torch.equal(fast, plain)  # same GEMM per expert on the same rows: bit-identical


def _official_moe_infer(ex: Experts, x: torch.Tensor, idx: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``DeepseekV2MoE.moe_infer`` of the official modeling_deepseek.py, transcribed."""
    cnts = idx.new_zeros((idx.shape[0], ex.gate_proj.shape[0])).scatter_(1, idx, 1).sum(dim=0)
    idxs = idx.view(-1).argsort()
    sorted_tokens = x[idxs // idx.shape[1]]
    outputs, start = [], 0
    for e, num in enumerate(cnts.tolist()):
        if num:
            outputs.append(ex.expert(e, sorted_tokens[start:start + num]))
            start += num
    outs = torch.cat(outputs, dim=0)
    new_x = torch.empty_like(outs)
    new_x[idxs] = outs
    return new_x.view(*idx.shape, -1).type(weight.dtype).mul_(weight.unsqueeze(dim=-1)).sum(dim=1).type(new_x.dtype)


@pytest.mark.parametrize("k", [2, 6])
@pytest.mark.parametrize("n", [1, 40])
def test_expert_combine_is_the_official_moe_infer_bit_for_bit(k, n):
    ex = _experts(torch.bfloat16, seed=k)
    x = torch.randn(n, 64, generator=torch.Generator().manual_seed(n)).bfloat16()
    idx, weight = _routing(n, k, 8, seed=n + k)
    with torch.no_grad():
        assert torch.equal(ex(x, idx, weight), _official_moe_infer(ex, x, idx, weight))


def test_grouped_experts_gradients_equal_per_expert_loop():
    idx, weight = _routing(12, 3, 8, seed=5)
    x = torch.randn(12, 64, generator=torch.Generator().manual_seed(6))
    grads = []
    for fn in ("forward", "forward_per_expert"):
        ex = _experts(torch.float32)
        xi = x.clone().requires_grad_()
        wi = weight.clone().requires_grad_()
        out = getattr(ex, fn)(xi, idx, wi)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        grads.append([xi.grad, wi.grad, ex.gate_proj.grad, ex.up_proj.grad, ex.down_proj.grad])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


def test_grouped_dispatch_has_no_host_sync(monkeypatch):
    """The default path never reads a tensor back to Python (what CUDA graphs and compile need)."""
    ex = _experts(torch.bfloat16)
    x = torch.randn(4, 64).to(torch.bfloat16)
    idx, weight = _routing(4, 3, 8, seed=1)

    def forbidden(*_a, **_k):
        raise AssertionError("host sync in the grouped MoE path")

    monkeypatch.setattr(torch.Tensor, "tolist", forbidden)
    monkeypatch.setattr(torch.Tensor, "item", forbidden)
    with torch.no_grad():
        ex(x, idx, weight)


def _bf16_step(v: torch.Tensor) -> torch.Tensor:
    """One bf16 rounding step (ulp) at the magnitude of each value of ``v``, in fp64 (tiny for zeros)."""
    v = v.double().abs()
    return torch.where(v > 0, torch.pow(2.0, torch.frexp(v)[1].double() - 8), torch.full_like(v, 2.0 ** -133))


@pytest.mark.parametrize("n", [1, 2, 8, 16])
def test_column_form_equals_per_expert_loop_at_released_widths(n):
    """Decode-sized batches take the transposed (column) form: equal to the per-expert loop within one
    bf16 rounding of each sum, at Tiny's 1280/896, on any CPU's GEMM kernels.

    Both forms round at the same points (gate, up, SiLU*up, down to bf16; the combine in fp32, then bf16);
    only the order of the fp32 dot products differs (torch's GEMV kernel against its GEMM kernel, which
    depend on the CPU: on this AVX512 machine they agree bit for bit, with torch's AVX2 kernels or on
    AMD Zen 3 they do not). Two fp32 orders of a 1280-term sum differ by <= 1280 * 2^-24 of the sum of
    |terms|, ~2^-14: far under one bf16 step (2^-8 relative), so a rounded projection differs only
    where its sum lies that close to a rounding midpoint, and then by one step. Such a flip of h_j moves
    a down-projection sum by |W_oj| * step(h_j), a small fraction of one step of the sum, so each
    expert output y_k differs by at most one bf16 step, and the combine sum_k w_k y_k by
    sum_k w_k step(y_k) plus one step of its own rounding: the bound asserted below. Flips are rare,
    so nearly every value is bit-identical (~0.1 % differ under torch's AVX2 kernels)."""
    from dsvl2.model.moe import COLUMN_FORM_MAX_TOKENS

    assert n <= COLUMN_FORM_MAX_TOKENS
    g = torch.Generator().manual_seed(n)
    ex = Experts(4, 1280, 896)
    for p in ex.parameters():
        p.data = (torch.randn(p.shape, generator=g) * 0.03).to(torch.bfloat16)
    x = torch.randn(n, 1280, generator=g).to(torch.bfloat16)
    idx, weight = _routing(n, 3, 4, seed=n)
    with torch.no_grad():
        assert ex._column_form_ok(x)  # the column form is what ex(...) runs here
        column, loop = ex(x, idx, weight), ex.forward_per_expert(x, idx, weight)
        slots = torch.stack([torch.cat([ex.expert(int(e), x[t:t + 1]) for e in idx[t]]) for t in range(n)])  # (N, K, D)
    bound = (weight.double()[..., None] * _bf16_step(slots)).sum(1) + _bf16_step(loop)
    assert ((column.double() - loop.double()).abs() <= bound).all()
    assert (column != loop).double().mean() < 0.01


@pytest.mark.parametrize("shape", [(896, 1280), (1280, 896), (4096, 1280)])
def test_single_row_linear_is_bit_identical(shape):
    """quant.linear sends one bf16 row through torch.mv: the same numbers as the module's GEMM path."""
    from dsvl2.model.quant import linear

    g = torch.Generator().manual_seed(shape[0])
    layer = torch.nn.Linear(shape[1], shape[0], bias=False).to(torch.bfloat16)
    layer.weight.data = (torch.randn(shape, generator=g) * 0.03).to(torch.bfloat16)
    x = torch.randn(1, 1, shape[1], generator=g).to(torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(linear(x, layer), layer(x))
        x3 = torch.randn(3, shape[1], generator=g).to(torch.bfloat16)
        assert torch.equal(linear(x3, layer), layer(x3))


@pytest.mark.slow
def test_compiled_decode_matches_eager():
    """GenerateArgs(compile=True): same greedy tokens, logits within fp32 noise (compiles for minutes)."""
    from toy import toy_batch, toy_model

    from dsvl2.generation.generate import GenerateArgs

    model = toy_model("mla", seed=1)
    ids, mask, *_ = toy_batch(model, seed=2, lengths=(12, 20), images=False)
    _assert_same_generation(model, (ids, mask, None, None, None), GenerateArgs(max_new_tokens=5),
                            GenerateArgs(max_new_tokens=5, compile=True))


def _assert_same_generation(model, inputs, args_a, args_b, plans=None):
    """Greedy generation under ``args_a`` and ``args_b`` (and ``plans``, default exact): same tokens,
    logits within fp32 noise."""
    from dsvl2.generation.generate import generate
    from dsvl2.model.plan import EXACT, apply

    runs = []
    for args, plan in zip((args_a, args_b), plans or (EXACT, EXACT)):
        steps = generate(apply(model, plan), *inputs, args, eos_token_id=1, return_logits=True)
        runs.append([(s.tokens, s.logits) for s in steps])
    for (ta, la), (tb, lb) in zip(*runs):
        assert torch.equal(ta, tb)
        torch.testing.assert_close(lb, la, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("variant", ["mha", "mla"])
def test_decode_attention_fp32_route_is_bit_identical(variant, monkeypatch):
    """One query row over the cache goes through fp32 (cache_matmul): the same bf16 numbers as torch's
    bf16 matmul, which the golden parity was recorded with."""
    from toy import toy_model

    from dsvl2.model import attention
    from dsvl2.model.cache import make_cache
    from dsvl2.model.llm import causal_mask

    model = toy_model(variant, seed=3, dtype=torch.bfloat16)
    lm = model.language.model
    g = torch.Generator().manual_seed(4)
    t = 300
    x = (torch.randn(1, t + 1, 64, generator=g) * 0.5).to(torch.bfloat16)
    mask = torch.ones(1, t + 1, dtype=torch.bool)
    outs = []
    for route in (True, False):
        if not route:
            monkeypatch.setattr(attention, "one_cpu_query_row", lambda a: False)
        cache = make_cache(lm.cfg, 1, t + 1, torch.bfloat16, "cpu")
        with torch.no_grad():
            lm(x[:, :t], torch.arange(t)[None], causal_mask(mask[:, :t], 0, t, torch.bfloat16), cache)
            outs.append(lm(x[:, t:], torch.tensor([[t]]), None, cache))
    assert torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("variant", ["mha", "mla", "noaux"])
def test_fused_attention_decode_equals_reference_form(variant):
    """A plan with fused_attention: SDPA prefill and decode give the reference logits (fp32)."""
    from toy import toy_batch, toy_model

    from dsvl2.generation.generate import GenerateArgs
    from dsvl2.model.plan import EXACT, Plan

    model = toy_model(variant, seed=5)
    inputs = toy_batch(model, seed=6, lengths=(14, 25))  # ids, mask, tiles, seq_mask, crop
    args = GenerateArgs(max_new_tokens=4)
    _assert_same_generation(model, inputs, args, args, plans=(EXACT, Plan(fused_attention=True)))


@pytest.mark.parametrize("batch", [1, 3])
def test_mla_decode_fp32_route_is_bit_identical_at_small_widths(batch, monkeypatch):
    """Small's MLA widths (16 heads, latent 512, rope 64): heads-merged fp32 decode matches the bf16
    reference up to last-bit ties of the different fp32 summation order (then spread by o_proj)."""
    import dataclasses

    from dsvl2.config import PRESETS
    from dsvl2.model import attention
    from dsvl2.model.cache import make_cache
    from dsvl2.model.layers import RotaryTable

    cfg = dataclasses.replace(PRESETS["small"].language_config, num_hidden_layers=1)
    g = torch.Generator().manual_seed(batch)
    mla = attention.MLA(cfg, 0)
    for p in mla.parameters():
        p.data = (torch.randn(p.shape, generator=g) * 0.02 + (1.0 if p.dim() == 1 else 0.0)).to(torch.bfloat16)
    rotary = RotaryTable(cfg.qk_rope_head_dim, cfg.rope_theta, cfg.max_position_embeddings, tabulated=True)
    t = 200
    x = torch.randn(batch, t + 1, cfg.hidden_size, generator=g).to(torch.bfloat16)
    pos = torch.arange(t + 1)[None].expand(batch, -1)
    cos, sin = rotary(pos, torch.bfloat16)
    outs = []
    for route in (True, False):
        if not route:
            monkeypatch.setattr(attention, "one_cpu_query_row", lambda a: False)
        cache = make_cache(cfg, batch, t + 1, torch.bfloat16, "cpu")
        with torch.no_grad():
            mla(x[:, :t], cos[:, :t], sin[:, :t], None, cache)
            cache.advance(t)
            outs.append(mla(x[:, t:], cos[:, t:], sin[:, t:], None, cache))
    torch.testing.assert_close(outs[0], outs[1], atol=2e-3, rtol=2e-2)


@pytest.mark.parametrize("padded", [False, True])
def test_decode_step_with_padding_decided_once_has_no_graph_break(padded):
    """decode_one_token(padded=...) == the form that reads the mask, and traces as one graph (the
    per-step ``attention_mask.all()`` host sync was a graph break under torch.compile)."""
    from toy import toy_batch, toy_model

    from dsvl2.generation.generate import decode_one_token, prefill
    from dsvl2.model.cache import make_cache

    # bf16: the grouped expert GEMMs (fp32 under compile takes the per-expert loop, which syncs by design)
    model = toy_model("mla", seed=1).to(torch.bfloat16)
    ids, mask, *_ = toy_batch(model, seed=2, lengths=(12, 20) if padded else (20, 20), images=False)
    assert bool(~mask.all()) == padded
    lc = model.cfg.language_config
    outs = []
    for flag in (None, padded):
        cache = make_cache(lc, 2, 24, model.dtype, "cpu")
        with torch.no_grad():
            tok = prefill(model, model.language.model.embed_tokens(ids), mask, cache).argmax(-1)
            m = torch.cat([mask, torch.ones(2, 1, dtype=torch.bool)], dim=1)
            outs.append(decode_one_token(model, tok, m, cache, False, flag))
    assert torch.equal(outs[0], outs[1])
    cache = make_cache(lc, 2, 24, model.dtype, "cpu")
    with torch.no_grad():
        prefill(model, model.language.model.embed_tokens(ids), mask, cache)
        explained = torch._dynamo.explain(decode_one_token)(model, tok, m, cache, False, padded)
    assert explained.graph_break_count == 0, explained.break_reasons
