"""How often the demo model writes an unparsable box, with and without box-constrained decoding,
and what the constraint costs per generated token.

    python bench/box_constraint.py [--n 200] [--golden ../shared/golden]

An answer counts as unparsable when it has no box that parses or when the parser reports a problem
other than corners out of order (which it repairs by sorting). The cost is the time of the
processor's mask + state update per step, alone (on a 704-token and a 129,280-token vocabulary), and
the demo model's whole decode step with and without it.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import torch

import dsvl2
from dsvl2.demo.tasks import generate as demo_samples
from dsvl2.generation.box_order import OrderedBoxConstraint
from dsvl2.generation.constraints import BoxConstraint, box_automaton
from dsvl2.processing.grounding import parse_grounding


def unparsable(text: str) -> bool:
    result = parse_grounding(text)
    return not result.boxes or any("swapped" not in e for e in result.errors)


def swapped(text: str) -> bool:
    return any("swapped" in e for e in parse_grounding(text).errors)


def rates(pipe: dsvl2.Pipeline, n: int, chunk: int = 25) -> None:
    samples = demo_samples(n, seed=990001, tasks=("grounding",))
    convs = [[{"role": "user", "content": s.prompt, "images": [s.image]}] for s in samples]
    modes = {"unconstrained": {}, "constrained": {"constrain_boxes": True}, "ordered": {"ordered_boxes": True}}
    for label, gen in (("greedy", {}), ("T=1.0", {"temperature": 1.0, "seed": 1}),
                       ("T=1.5", {"temperature": 1.5, "seed": 2})):
        counts = []
        for mode, extra in modes.items():
            texts = []
            for i in range(0, n, chunk):
                texts += pipe.generate_batch(convs[i:i + chunk], max_new_tokens=48, skip_special_tokens=False,
                                             **extra, **gen)
            counts.append(f"{mode} {sum(map(unparsable, texts))}/{n} unparsable, {sum(map(swapped, texts))} swapped")
        print(f"{label:7s} " + "; ".join(counts))


def processor_cost(pipe: dsvl2.Pipeline, rows: int, steps: int = 300, ordered: bool = False) -> float:
    vocab = pipe.model.cfg.language_config.vocab_size
    kind = OrderedBoxConstraint if ordered else BoxConstraint
    proc = kind(box_automaton(pipe.tokenizer, vocab), rows, "cpu")
    logits = torch.randn(rows, vocab)
    token = torch.zeros(rows, dtype=torch.long)
    start = time.perf_counter()
    for i in range(steps):
        proc(logits, 1000)
        proc.advance(token)
    return (time.perf_counter() - start) / steps * 1e6


def step_cost(pipe: dsvl2.Pipeline, constrained: bool, reps: int = 5) -> float:
    image = demo_samples(1, seed=5, tasks=("grounding",))[0].image
    conv = pipe.conversation("<image>\nDescribe.", [image])
    batch = pipe.prepare([conv])
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        pipe._run(batch, dsvl2.GenerateArgs(max_new_tokens=64, constrain_boxes=constrained), (), False)
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--golden", type=Path, default=Path(__file__).resolve().parents[1].parent / "shared" / "golden")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"CPU {platform.processor() or platform.machine()}, 1 thread, load average {os.getloadavg()} (shared machine)")
    pipe = dsvl2.load(dtype="fp32", device="cpu")
    rates(pipe, args.n)
    free, boxed = step_cost(pipe, False), step_cost(pipe, True)
    print(f"demo model, 64 new tokens (1 prefill + 63 decode steps): {free * 1e3:.1f} ms free, {boxed * 1e3:.1f} ms "
          f"constrained (+{(boxed - free) / 64 * 1e6:.0f} us per token)")
    for name, p in (("demo (704 ids)", pipe),
                    ("golden micro (129,280 ids)", dsvl2.load(args.golden / "checkpoints" / "micro-mla", dtype="fp32",
                                                              device="cpu"))):
        for rows in (1, 8):
            plain, ordered = processor_cost(p, rows), processor_cost(p, rows, ordered=True)
            print(f"mask + update alone, {name}, batch {rows}: {plain:.0f} us per step ({ordered:.0f} with ordered corners)")


if __name__ == "__main__":
    main()
