"""Decode speed of the fast paths against the plain forms they replace, interleaved in one process.

    python bench/fast_paths.py --model /work/ckpt/tiny [--prompt 1036] [--rounds 6] [--steps 6]

Variants (all greedy, same weights, same cache length):
- ``plain``: the forms before the fast paths: experts one by one in a Python loop (host-read counts),
  every linear through ``F.linear``, attention scores and weighted sums through torch's bf16 matmul;
- ``default``: what ``generate`` runs (bit-identical to ``plain``): grouped expert GEMMs (transposed
  for decode), single-row linears through ``torch.mv``, one query row over the cache in fp32;
- ``fused``: a plan with ``fused_attention`` only: SDPA over the cache (bf16-close);
- ``kernels``: the fast plan ``dsvl2.load`` chooses (``fused`` plus dsvl2's C kernels in the build this
  CPU runs, ``$DSVL2_CPU_ISA`` to force one): batch-1 decode steps in C (bf16-close).
``plain``, ``default`` and ``fused`` run under the exact plan (``default``) or its fused variant.
Then prefill of the same prompt (batch 1), interleaved the same way: ``unblocked`` (the reference
attention over all query rows at once, as before), ``default`` (in blocks of 128 query rows,
bit-identical) and ``fused`` (SDPA).
Each round decodes ``--steps`` tokens per variant in turn (A, B, C, A, B, C, ...), so a change of the
machine's load hits all variants alike; the best and median rounds are printed, with ratios to plain.
A prompt of random token ids stands in for the 1-image prompt (same length, no vision work).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see bench/decode.py

import argparse
import contextlib
import statistics
import time

import torch

import dsvl2
from dsvl2.generation import generate as gen
from dsvl2.model import attention, llm, moe
from dsvl2.model.cache import make_cache
from dsvl2.model.plan import EXACT, Plan, apply, resolve


@contextlib.contextmanager
def plain_forms():
    """Swap the fast paths for the plain forms (module attributes restored on exit)."""
    saved = (attention.linear, llm.linear, attention.one_cpu_query_row, moe.grouped_mm_supported)
    attention.linear = llm.linear = lambda x, layer, plan=None: layer(x)
    attention.one_cpu_query_row = lambda a: False
    moe.grouped_mm_supported = lambda x: False
    try:
        yield
    finally:
        attention.linear, llm.linear, attention.one_cpu_query_row, moe.grouped_mm_supported = saved


def planned(model, plan: Plan):
    """A context that runs ``model`` under ``plan`` (the exact plan again on exit)."""
    @contextlib.contextmanager
    def ctx():
        apply(model, plan)
        try:
            yield
        finally:
            apply(model, EXACT)
    return ctx


@contextlib.contextmanager
def unblocked_attention():
    saved = attention.CPU_QUERY_BLOCK
    attention.CPU_QUERY_BLOCK = 1 << 30
    try:
        yield
    finally:
        attention.CPU_QUERY_BLOCK = saved


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--prompt", type=int, default=1036)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    model = dsvl2.load(a.model, dtype="bf16", device="cpu", exact=True).model
    fast = resolve("cpu", torch.bfloat16)
    lc = model.cfg.language_config
    print(f"model {a.model}, prompt {a.prompt} tokens, threads {a.threads}, loadavg {os.getloadavg()[0]:.2f}")
    print("fast plan:", fast.describe())
    variants = {"plain": (plain_forms, False), "default": (contextlib.nullcontext, False),
                "fused": (contextlib.nullcontext, True)}
    if fast.kernels:
        variants["kernels"] = (planned(model, fast), True)
    for b in a.batch:
        ids = torch.randint(1000, 100000, (b, a.prompt), generator=torch.Generator().manual_seed(b))
        mask = torch.ones(b, a.prompt, dtype=torch.bool)
        state = {}
        for name, (ctx, fused) in variants.items():
            cache = make_cache(lc, b, a.prompt + a.rounds * a.steps + 1, model.dtype, "cpu")
            with ctx(), torch.no_grad():
                embeds = model.language.model.embed_tokens(ids)
                logits = gen.prefill(model, embeds, mask, cache, expanded=fused)
            state[name] = [logits.argmax(-1), mask, cache]
        rates: dict[str, list[float]] = {name: [] for name in variants}
        for _ in range(a.rounds):
            for name, (ctx, fused) in variants.items():
                tok, m, cache = state[name]
                with ctx():
                    t0 = time.perf_counter()
                    for _ in range(a.steps):
                        m = torch.cat([m, torch.ones(b, 1, dtype=torch.bool)], dim=1)
                        tok = gen.decode_one_token(model, tok, m, cache, fused).argmax(-1)
                    rates[name].append(b * a.steps / (time.perf_counter() - t0))
                state[name] = [tok, m, cache]
        best = {k: max(v) for k, v in rates.items()}
        median = {k: statistics.median(v) for k, v in rates.items()}
        print(f"batch {b}: tokens/s best " + ", ".join(f"{k} {v:.2f}" for k, v in best.items())
              + " | median " + ", ".join(f"{k} {v:.2f}" for k, v in median.items()))
        print(f"batch {b}: best vs plain " + ", ".join(f"{k} {best[k] / best['plain']:.2f}x" for k in variants)
              + f" | loadavg {os.getloadavg()[0]:.2f}")

    prefill_variants = {"unblocked": (unblocked_attention, False), "default": (contextlib.nullcontext, False),
                        "fused": (contextlib.nullcontext, True)}
    ids = torch.randint(1000, 100000, (1, a.prompt), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(1, a.prompt, dtype=torch.bool)
    times: dict[str, list[float]] = {name: [] for name in prefill_variants}
    with torch.no_grad():
        embeds = model.language.model.embed_tokens(ids)
        for r in range(a.rounds // 2 + 1):
            for name, (ctx, fused) in prefill_variants.items():
                cache = make_cache(lc, 1, a.prompt, model.dtype, "cpu")
                with ctx():
                    t0 = time.perf_counter()
                    gen.prefill(model, embeds, mask, cache, expanded=fused)
                    if r:  # round 0 warms up
                        times[name].append(time.perf_counter() - t0)
    best = {k: min(v) for k, v in times.items()}
    print(f"prefill {a.prompt} tokens: best s " + ", ".join(f"{k} {v:.2f}" for k, v in best.items())
          + " | speed vs unblocked " + ", ".join(f"{k} {best['unblocked'] / v:.2f}x" for k, v in best.items())
          + f" | loadavg {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
