"""The execution plan (dsvl2/model/plan.py): what ``dsvl2.load`` resolves, and its quality gate against the
exact path (last-position logits cosine >= 0.995; the first 8 greedy tokens of the trained demo model).

The gate runs on whichever kernel build this host selects; ``make test`` runs it again with
``DSVL2_CPU_ISA=avx2`` and ``generic``."""

from __future__ import annotations

import pytest
import torch
from golden_utils import STRUCTURES, cases, conversation, teacher_forced_logits

import dsvl2
from dsvl2.model import cpu_kernels
from dsvl2.model.plan import EXACT, Plan, resolve


def test_resolution_follows_device_dtype_and_exact():
    assert resolve("cpu", torch.bfloat16, exact=True).exact
    fp32 = resolve("cpu", torch.float32)
    assert fp32.fused_attention and fp32.kernels is None and "float32" in fp32.describe()
    gpu = resolve("cuda", torch.bfloat16)  # resolving does not touch the device
    assert gpu.kernels is None and "CPU-only" in gpu.describe()
    bf16 = resolve("cpu", torch.bfloat16)
    assert bf16.kernels == cpu_kernels.host_isa()[0] and bf16.fused_attention
    assert EXACT.exact and not Plan(fused_attention=True).exact
    with pytest.raises(ValueError, match="neon9"):
        Plan(kernels="neon9")


@pytest.fixture(scope="module")
def pairs(golden_dir):
    out = {}
    for s in STRUCTURES:
        ckpt = golden_dir / "checkpoints" / s
        out[s] = (dsvl2.load(ckpt, dtype="bf16", device="cpu", exact=True),
                  dsvl2.load(ckpt, dtype="bf16", device="cpu"))
    return out


def test_load_is_fast_by_default_and_exact_on_request(pairs):
    exact, fast = pairs["micro-mla"]
    assert exact.plan.exact and not fast.plan.exact
    assert fast.plan == resolve("cpu", torch.bfloat16)
    mods = [m for m in fast.model.modules() if hasattr(type(m), "plan")]
    assert mods and all(m.plan is fast.plan for m in mods)  # every dispatching module holds the one plan
    assert all(m.plan is exact.plan for m in exact.model.modules() if hasattr(type(m), "plan"))


def test_fast_plan_quality_gate_on_golden_cases(pairs, golden_dir):
    """cosine(last-position logits, fast vs exact) >= 0.995 on the golden cases (bench/quant_gate.py: all 42)."""
    for structure, (exact, fast) in pairs.items():
        for case in cases(golden_dir):
            if case["id"] not in ("no_image", "one_image_chart", "multi_turn"):
                continue
            batch = exact.processor(conversation(golden_dir, case))
            a, b = teacher_forced_logits(exact, batch, [5])[0], teacher_forced_logits(fast, batch, [5])[0]
            assert torch.nn.functional.cosine_similarity(a, b, dim=0) >= 0.995, (structure, case["id"])


def test_fast_plan_greedy_answers_of_the_trained_demo_model():
    """The greedy criterion on a trained model: the first 8 tokens of the fast plan equal the exact path's."""
    from dsvl2.demo import default_model_dir
    from dsvl2.demo.tasks import generate

    exact = dsvl2.load(default_model_dir(), dtype="bf16", device="cpu", exact=True)
    fast = dsvl2.load(default_model_dir(), dtype="bf16", device="cpu")
    convs = [[{"role": "user", "content": s.prompt, "images": [s.image]}] for s in generate(4, seed=4242)]
    # one conversation at a time: batch-1 decode is what the kernels run
    same = sum(exact.complete(c, max_new_tokens=8).token_ids == fast.complete(c, max_new_tokens=8).token_ids
               for c in convs)
    assert same >= 11, f"{same}/12"


def test_wide_gemms_where_the_cpu_lacks_native_bf16(monkeypatch):
    """Forced portable kernels stand for a CPU without native bf16: the plan widens many-row GEMMs to fp32."""
    monkeypatch.setenv(cpu_kernels.ISA_ENV, "avx2")
    assert resolve("cpu", torch.bfloat16).wide_gemms
    assert not resolve("cpu", torch.float32).wide_gemms
    if "avx512" in cpu_kernels.cpu_isas():
        monkeypatch.setenv(cpu_kernels.ISA_ENV, "avx512")
        assert not resolve("cpu", torch.bfloat16).wide_gemms


@pytest.mark.parametrize("variant", ["mha", "mla"])
def test_wide_gemm_prefill_is_bf16_close_to_the_exact_path(variant, monkeypatch):
    """fp32 GEMMs (weights widened per layer / expert) round where the bf16 GEMMs round: the prefill logits
    agree to bf16 accuracy, and the widened forms did run (vision, linears, experts)."""
    from toy import toy_batch, toy_model

    from dsvl2.generation.generate import prefill
    from dsvl2.model.cache import make_cache
    from dsvl2.model.moe import Experts
    from dsvl2.model.plan import apply

    model = toy_model(variant, seed=3, dtype=torch.bfloat16)
    ids, mask, tiles, seq_mask, crop = toy_batch(model, seed=4, lengths=(30,))
    calls = []
    monkeypatch.setattr(Experts, "_per_expert_wide", lambda self, r, c, f=Experts._per_expert_wide:
                        calls.append(1) or f(self, r, c))
    out = []
    for plan in (EXACT, Plan(wide_gemms=True)):
        apply(model, plan)
        with torch.no_grad():
            embeds = model.prepare_inputs_embeds(ids, tiles.bfloat16(), seq_mask, crop)
            cache = make_cache(model.cfg.language_config, 1, embeds.shape[1], model.dtype, "cpu")
            out.append(prefill(model, embeds, mask, cache))
    assert calls
    assert torch.nn.functional.cosine_similarity(out[0][0], out[1][0], dim=0) > 0.999
    torch.testing.assert_close(out[1], out[0], rtol=0.05, atol=0.05 * float(out[0].abs().max()))
