"""Quality gate of the fast execution plan and of int8 weights, on the golden cases (../shared/golden)
and the trained demo model.

    python bench/quant_gate.py [--golden ../shared/golden] [--steps 8] [--demo 60] [--quantize int8]

For each golden micro checkpoint (the three attention/router structures) and each of the 14 cases,
and for the shipped demo model (trained, so its logits are not near-tied as random weights' are) on
``--demo`` held-out demo-task prompts, these pairs are compared:
- ``fast/exact``: the default load (the fast plan for this machine: SDPA attention, dsvl2's C kernels
  in the build this CPU runs, ``$DSVL2_CPU_ISA`` to force one) against ``exact=True`` (the reference path);
- ``int8/exact``: ``quantize="int8"`` (fast plan) against the exact bf16 model;
- ``bf16/fp32`` (yardstick): exact bf16 against exact fp32, the precision the official bf16 checkpoint
  already gives up (random-weight micro models have many near-tied logits).
on two numbers: the cosine of the last prompt position's logits (gate: >= 0.995) and whether the first
``--steps`` greedy tokens are identical (gate: the cases where bf16 itself keeps fp32's tokens).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

import dsvl2
from dsvl2.generation.generate import GenerateArgs, generate, prefill
from dsvl2.model.cache import make_cache

GOLDEN = Path(__file__).resolve().parents[2] / "shared" / "golden"
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from golden_utils import STRUCTURES, cases, conversation

PAIRS = (("fast", "exact"), ("int8", "exact"), ("exact", "fp32"))


@torch.no_grad()
def last_logits(pipe, batch) -> torch.Tensor:
    model = pipe.model
    embeds = model.prepare_inputs_embeds(batch.input_ids, batch.images, batch.images_seq_mask,
                                         batch.images_spatial_crop)
    cache = make_cache(model.cfg.language_config, 1, batch.input_ids.shape[1], model.dtype, "cpu")
    return prefill(model, embeds, batch.attention_mask.bool(), cache)[0].float()


def greedy(pipe, batch, n: int) -> list[int]:
    steps = generate(pipe.model, batch.input_ids, batch.attention_mask, batch.images, batch.images_seq_mask,
                     batch.images_spatial_crop, GenerateArgs(max_new_tokens=n), pipe.tokenizer.eos_id)
    return [int(s.tokens[0]) for s in steps]


def compare(pipes: dict, batches: list, steps: int) -> list[list[tuple[float, bool]]]:
    """Per batch, per pair of ``PAIRS``: (logits cosine, first ``steps`` greedy tokens identical)."""
    out = []
    for batch in batches:
        logits = {k: last_logits(p, batch) for k, p in pipes.items()}
        tokens = {k: greedy(p, batch, steps) for k, p in pipes.items()}
        cos = torch.nn.functional.cosine_similarity
        out.append([(cos(logits[a], logits[b], dim=0).item(), tokens[a] == tokens[b]) for a, b in PAIRS])
    return out


def pipes_of(ckpt, quantize: str) -> dict:
    return {"fp32": dsvl2.load(ckpt, dtype="fp32", device="cpu", exact=True),
            "exact": dsvl2.load(ckpt, dtype="bf16", device="cpu", exact=True),
            "fast": dsvl2.load(ckpt, dtype="bf16", device="cpu"),
            "int8": dsvl2.load(ckpt, dtype="bf16", device="cpu", quantize=quantize)}


def summary(name: str, rows: list, steps: int) -> None:
    n = len(rows)
    for j, (a, b) in enumerate(PAIRS):
        print(f"{name}: {a} vs {b}: min cosine {min(r[j][0] for r in rows):.5f}, cases >= 0.995: "
              f"{sum(r[j][0] >= 0.995 for r in rows)}/{n}, first {steps} greedy tokens identical: "
              f"{sum(r[j][1] for r in rows)}/{n}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--golden", type=Path, default=GOLDEN)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--demo", type=int, default=60, help="held-out demo prompts for the trained demo model (0: none)")
    ap.add_argument("--quantize", default="int8", help="the quantized mode compared (pipe 'int8')")
    a = ap.parse_args()
    torch.set_num_threads(2)
    pipes = pipes_of(a.golden / "checkpoints" / STRUCTURES[0], a.quantize)
    print("fast plan:", pipes["fast"].plan.describe())
    rows = []
    for structure in STRUCTURES:
        pipes = pipes_of(a.golden / "checkpoints" / structure, a.quantize)
        all_cases = cases(a.golden)
        batches = [pipes["exact"].processor(conversation(a.golden, case)) for case in all_cases]
        rows += [(structure, case["id"], r) for case, r in zip(all_cases, compare(pipes, batches, a.steps))]
    print(f"{'structure':<16} {'case':<22} " + " ".join(f"{'cos ' + x + '/' + y:>16} {'greedy=':>7}" for x, y in PAIRS))
    for s, c, r in rows:
        print(f"{s:<16} {c:<22} " + " ".join(f"{cos:16.5f} {same!s:>7}" for cos, same in r))
    summary("golden micro (random weights)", [r for *_, r in rows], a.steps)
    if a.demo:
        from dsvl2.demo import default_model_dir
        from dsvl2.demo.build import EVAL_SEED
        from dsvl2.demo.tasks import generate as demo_samples

        pipes = pipes_of(default_model_dir(), a.quantize)
        batches = [pipes["exact"].processor([{"role": "user", "content": s.prompt, "images": [s.image]}])
                   for s in demo_samples(a.demo // 3, EVAL_SEED + 1)]
        summary(f"demo model (trained), {len(batches)} held-out prompts", compare(pipes, batches, a.steps), a.steps)


if __name__ == "__main__":
    main()
