"""Decode speed of the static step (``dsvl2.generation.static``): eager vs CUDA graphs, per batch bucket.

    python bench/static_decode.py --preset tiny --device cuda --json out.json
    python bench/static_decode.py --preset small --layers 4 --device cuda
    python bench/static_decode.py --preset tiny --layers 2 --device cpu --batches 1,4 --steps 8   # a smoke run

Random weights built on the device (``bench/decode.py``'s ``random_model``; no checkpoint, no
tokenizer: text-only prompts of random ids). For each batch size B: B slots are prefilled with
``--prompt`` tokens each (distinct rows), then ``--steps`` greedy static steps run, timed, first
eagerly and then (CUDA, unless ``--no-graphs``) by replaying the step captured for (B, window);
the window is fixed for the whole run (``window_bucket(prompt + steps + 1)``). Also today's
``decode_one_token`` at batch 1, the reference. Reports tokens/s (B x steps / time), the batch-1
HBM bound (read bandwidth / bytes a step reads, as ``bench/decode.py`` computes it), batch-B over
batch-1, capture times, and whether eager and replayed steps chose the same greedy tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import types
from pathlib import Path

import torch

from dsvl2.generation.generate import decode_one_token, prefill
from dsvl2.generation.static import SlotCache, StepRunner, window_bucket
from dsvl2.model.cache import make_cache
from dsvl2.pipeline import resolve_dtype

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode import random_model, weight_bytes_per_token  # noqa: E402
from make_checkpoint import preset_config  # noqa: E402


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def read_bandwidth(dev: torch.device) -> float:
    """GB/s of a large fp32 sum on ``dev`` (best of 3)."""
    x = torch.ones((1 << 29) // 4 if dev.type == "cuda" else (1 << 27) // 4, device=dev)
    best = float("inf")
    for _ in range(3):
        sync(dev)
        t0 = time.perf_counter()
        x.sum().item()
        best = min(best, time.perf_counter() - t0)
    return x.numel() * 4 / best / 1e9


def run_steps(runner: StepRunner, slots: SlotCache, b: int, window: int, steps: int,
              dev: torch.device) -> tuple[float, list[list[int]]]:
    """``steps`` greedy steps of slots 0..b-1 from the current state; seconds per step and the tokens."""
    chosen = []
    sync(dev)
    t0 = time.perf_counter()
    for _ in range(steps):
        nxt = runner(b, window).argmax(-1)
        slots.tokens[:b] = nxt
        slots.lengths[:b] += 1
        chosen.append(nxt)
    sync(dev)
    return (time.perf_counter() - t0) / steps, [c.tolist() for c in chosen]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--device", default="cuda", choices=["cpu", "cuda"])
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--batches", default="1,2,4,8,16,32")
    ap.add_argument("--prompt", type=int, default=400)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--no-graphs", action="store_true")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    dev = torch.device(a.device)
    dtype = resolve_dtype(a.dtype)
    cfg = preset_config(a.preset, a.layers)
    lc = cfg.language_config
    torch.manual_seed(0)
    model = random_model(cfg, dtype, dev)
    batches = [int(x) for x in a.batches.split(",")]
    max_len = a.prompt + 2 * a.steps + 8
    window = window_bucket(a.prompt + 2 * a.steps + 2, max_len)
    r: dict = {"model": f"random:{a.preset}" + (f"(layers={a.layers})" if a.layers else ""), "dtype": a.dtype,
               "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu", "torch": torch.__version__,
               "prompt": a.prompt, "steps": a.steps, "window": window, "loadavg_start": os.getloadavg()[0]}
    graphs = dev.type == "cuda" and not a.no_graphs
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1000, lc.vocab_size - 1000, (max(batches), a.prompt), generator=g).to(dev)

    with torch.no_grad():  # today's decode, batch 1: the reference speed
        cache = make_cache(lc, 1, max_len, dtype, dev)
        mask = torch.ones(1, a.prompt, dtype=torch.bool, device=dev)
        tok = prefill(model, model.language.model.embed_tokens(ids[:1]), mask, cache).argmax(-1)
        for i in range(a.steps + 4):
            if i == 4:
                sync(dev)
                t0 = time.perf_counter()
            mask = torch.cat([mask, torch.ones(1, 1, dtype=torch.bool, device=dev)], dim=1)
            tok = decode_one_token(model, tok, mask, cache, padded=False).argmax(-1)
        sync(dev)
        r["decode_one_token_b1_tok_s"] = a.steps / (time.perf_counter() - t0)
        del cache

    for b in batches:
        slots = SlotCache(lc, b, max_len, dtype, dev)
        with torch.no_grad():
            for s in range(b):
                first = prefill(model, model.language.model.embed_tokens(ids[s:s + 1]),
                                torch.ones(1, a.prompt, dtype=torch.bool, device=dev), slots.row(s))
                slots.tokens[s] = first.argmax(-1)[0]
        slots.lengths[:b] = a.prompt
        start_tokens, start_lengths = slots.tokens.clone(), slots.lengths.clone()
        eager = StepRunner(model, slots, graphs=False)
        run_steps(eager, slots, b, window, 2, dev)  # warm-up
        slots.tokens.copy_(start_tokens), slots.lengths.copy_(start_lengths)
        t_eager, tok_eager = run_steps(eager, slots, b, window, a.steps, dev)
        r[f"eager_b{b}_tok_s"] = b / t_eager
        if graphs:
            replay = StepRunner(model, slots, graphs=True)
            slots.tokens.copy_(start_tokens), slots.lengths.copy_(start_lengths)
            sync(dev)
            t0 = time.perf_counter()
            replay(b, window)  # captures (and replays once)
            sync(dev)
            r[f"capture_b{b}_s"] = time.perf_counter() - t0
            slots.tokens.copy_(start_tokens), slots.lengths.copy_(start_lengths)
            t_graph, tok_graph = run_steps(replay, slots, b, window, a.steps, dev)
            r[f"graph_b{b}_tok_s"] = b / t_graph
            same = sum(x == y for s_e, s_g in zip(tok_eager, tok_graph) for x, y in zip(s_e, s_g))
            r[f"graph_b{b}_same_greedy_tokens"] = f"{same}/{b * a.steps}"
        print(json.dumps({k: v for k, v in r.items() if f"b{b}_" in k}), flush=True)
        del slots
        if dev.type == "cuda":
            torch.cuda.empty_cache()

    bw = read_bandwidth(dev)
    read1 = weight_bytes_per_token(types.SimpleNamespace(model=model), 1)
    best = "graph" if graphs else "eager"
    r.update(read_GBps=bw, bytes_read_per_token_GB=read1 / 1e9, bound_b1_tok_s=bw * 1e9 / read1)
    if 1 in batches:
        r["best_b1_vs_bound"] = r[f"{best}_b1_tok_s"] / r["bound_b1_tok_s"]
        top = max(batches)
        r[f"{best}_b{top}_over_b1"] = r[f"{best}_b{top}_tok_s"] / r[f"{best}_b1_tok_s"]
    if dev.type == "cuda":
        r["peak_gpu_mem_GB"] = torch.cuda.max_memory_allocated(dev) / 1e9
    r["loadavg_end"] = os.getloadavg()[0]
    print(json.dumps(r, indent=1))
    if a.json:
        a.json.write_text(json.dumps(r, indent=1))


if __name__ == "__main__":
    main()
