"""The static-shape decode step (``dsvl2.generation.static``) against today's decode.

- Same batch, window = the cache length: bit-identical fp32 logits to ``decode_one_token`` (MHA, MLA,
  noaux routing), step after step: the per-row writes, the length mask and the positions add nothing.
- Slots of different lengths, one fixed window, a row joining later and an idle slot: each row's
  greedy tokens equal its own single run through ``generate`` and its logits stay within fp32 noise
  (a longer window makes BLAS sum in another blocking, so not bitwise).
- The gathered-weight MoE form (CUDA-graph capture without the grouped GEMM) equals the per-expert loop.
- CUDA graphs (skips only without CUDA): replayed steps give the eager static step's tokens.
"""

from __future__ import annotations

import pytest
import torch

from dsvl2.generation.generate import GenerateArgs, decode_one_token, generate, prefill
from dsvl2.generation.static import SlotCache, StepRunner, batch_bucket, static_decode_step, window_bucket
from dsvl2.model.cache import make_cache
from toy import toy_batch, toy_model

VARIANTS = ("mha", "mla", "noaux")


@pytest.fixture(scope="module", params=VARIANTS)
def model(request):
    return toy_model(request.param, seed=3)


def test_buckets():
    assert [batch_bucket(n, 32) for n in (1, 2, 3, 5, 9, 17, 33)] == [1, 2, 4, 8, 16, 32, 32]
    assert [window_bucket(n, 1000) for n in (1, 64, 65, 300, 999)] == [64, 64, 128, 512, 1000]


def test_same_layout_is_bit_identical(model):
    """Equal-length rows (no padding): the static step with window = length + 1 is today's decode."""
    ids, mask, tiles, seq_mask, crop = toy_batch(model, seed=5, lengths=(20, 20, 20))
    b, t = ids.shape
    embeds = model.prepare_inputs_embeds(ids, tiles, seq_mask, crop)
    cache = make_cache(model.cfg.language_config, b, t + 8, model.dtype, "cpu")
    logits = prefill(model, embeds, mask, cache)
    slots = SlotCache(model.cfg.language_config, 4, t + 8, model.dtype, "cpu")
    for name in ("k", "v", "latent", "rope_key"):  # the same prefilled entries in slots 0..2
        if hasattr(cache, name):
            getattr(slots.store, name)[:, :b, ..., :t, :] = getattr(cache, name)[:, :, ..., :t, :]
    slots.lengths[:b] = t
    for _ in range(6):
        token = logits.argmax(-1)
        mask = torch.cat([mask, torch.ones(b, 1, dtype=torch.bool)], dim=1)
        logits = decode_one_token(model, token, mask, cache)
        slots.tokens[:b] = token
        static = static_decode_step(model, slots.tokens[:b], slots.step_view(b, cache.length))
        assert torch.equal(static, logits)
        slots.lengths[:b] += 1


def _single(model, seed: int, n: int, new: int):
    ids, mask, tiles, seq_mask, crop = toy_batch(model, seed=seed, lengths=(n,))
    steps = list(generate(model, ids, mask, tiles, seq_mask, crop, GenerateArgs(max_new_tokens=new), -1,
                          return_logits=True))
    return (ids, mask, tiles, seq_mask, crop), [int(s.tokens[0]) for s in steps], [s.logits[0] for s in steps]


def test_slots_of_different_lengths_equal_single_runs(model):
    new = 10
    rows = [_single(model, seed, n, new) for seed, n in ((7, 4), (8, 19), (9, 33))]
    slots = SlotCache(model.cfg.language_config, 8, 256, model.dtype, "cpu")
    runner = StepRunner(model, slots)
    out: dict[int, list[int]] = {0: [], 1: [], 2: []}
    logits_seen: dict[int, list[torch.Tensor]] = {0: [], 1: [], 2: []}
    lengths = [0, 0, 0]
    joins = {0: 0, 1: 0, 2: 3}  # slot 2 joins after three steps of the others (slot 3 stays idle)
    for step in range(new + 3):
        for r, at in joins.items():
            if at == step:  # prefill the newcomer into its slot, exactly as a single run does
                ids, mask, tiles, seq_mask, crop = rows[r][0]
                embeds = model.prepare_inputs_embeds(ids, tiles, seq_mask, crop)
                first = prefill(model, embeds, mask, slots.row(r))
                out[r].append(int(first.argmax(-1)))
                logits_seen[r].append(first[0])
                lengths[r] = ids.shape[1]
                slots.lengths[r] = lengths[r]
                slots.tokens[r] = out[r][-1]
        live = [r for r in out if joins[r] <= step and len(out[r]) < new]
        if not live:
            break
        window = window_bucket(max(lengths[r] for r in live) + 1, slots.max_len)
        logits = runner(batch_bucket(4, slots.slots), window)
        for r in live:
            out[r].append(int(logits[r].argmax()))
            logits_seen[r].append(logits[r].clone())
            lengths[r] += 1
            slots.lengths[r] += 1
            slots.tokens[r] = out[r][-1]
    for r, (_, tokens, ref_logits) in enumerate(rows):
        assert out[r] == tokens, f"slot {r}"
        for got, ref in zip(logits_seen[r], ref_logits, strict=True):
            torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_gathered_experts_equal_per_expert_loop():
    model = toy_model("mla", seed=4)
    experts = model.language.model.layers[1].mlp.experts
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(0))
    idx = torch.tensor([[0, 3], [3, 7], [1, 0], [7, 6], [2, 3]])
    weight = torch.rand(5, 2, generator=torch.Generator().manual_seed(1))
    from dsvl2.model.moe import dispatch

    gathered = dispatch(x, idx, weight, 8, experts._gathered)
    torch.testing.assert_close(gathered, experts.forward_per_expert(x, idx, weight), rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_graph_replay_equals_eager(dtype):
    """Two slot caches fed the same tokens: replayed graphs give the eager step's logits (close: where the
    grouped GEMM is missing, capture takes the gathered MoE form and eager the per-expert loop)."""
    model = toy_model("mla", seed=3, dtype=dtype).cuda()
    cfg = model.cfg.language_config
    caches = [SlotCache(cfg, 4, 128, dtype, "cuda") for _ in range(2)]
    runners = [StepRunner(model, caches[0], graphs=False), StepRunner(model, caches[1], graphs=True)]
    ids, mask, tiles, seq_mask, crop = toy_batch(model, seed=5, lengths=(9,))
    embeds = model.prepare_inputs_embeds(ids.cuda(), tiles.cuda(), seq_mask.cuda(), crop.cuda())
    live = [0, 2]  # two live slots, two idle ones
    for cache in caches:
        for slot in live:
            first = prefill(model, embeds, mask.cuda(), cache.row(slot))
            cache.lengths[slot], cache.tokens[slot] = ids.shape[1], first.argmax(-1)[0]
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=3e-2, atol=3e-2)
    for _ in range(8):
        eager, replayed = (runner(4, 64).clone() for runner in runners)
        torch.testing.assert_close(replayed[live], eager[live], **tol)
        for cache in caches:  # both continue from the eager step's tokens
            cache.tokens[live] = eager[live].argmax(-1)
            cache.lengths[live] += 1
    assert runners[1].captured == [(4, 64)] and runners[0].captured == []


@pytest.mark.parametrize("variant", ["mha", "mla"])
def test_lone_request_decodes_as_a_single_run_in_bf16(variant):
    """One request in the scheduler (slot 0, eager) decodes through ``decode_one_token`` itself: in bf16,
    where any other summation order would soon change a token, its tokens are the single run's."""
    from dsvl2.generation.scheduler import Scheduler, Sequence

    model = toy_model(variant, seed=6, dtype=torch.bfloat16)
    ids, mask, tiles, seq_mask, crop = toy_batch(model, seed=9, lengths=(12,))
    args = GenerateArgs(max_new_tokens=24)
    single = [int(s.tokens[0]) for s in generate(model, ids, mask, tiles, seq_mask, crop, args, -1)]
    sched = Scheduler(model, -1, slots=4, max_len=256)
    seq = Sequence(ids, args, tiles, seq_mask, crop)
    sched.add(seq)
    while not seq.finished:
        sched.step()
    assert seq.generated == single and sched.free_slots == 4
