"""Quality gate of int8 weight-only quantization on the golden cases (../shared/golden).

    python bench/quant_gate.py [--golden ../shared/golden] [--steps 8] [--demo 60] [--cpu-kernels]

For each golden micro checkpoint (the three attention/router structures) and each of the 14 cases,
and for the shipped demo model (trained, so its logits are not near-tied as random weights' are) on
``--demo`` held-out demo-task prompts, the bf16 model and the same checkpoint loaded with
``quantize="int8"`` are compared on:
- the cosine of the last prompt position's logits (gate: >= 0.995);
- greedy decoding: whether the first ``--steps`` tokens are identical (gate: most cases).
As a yardstick the same two numbers are printed for bf16 against fp32 (the precision the official
bf16 checkpoint already gives up), since random-weight micro models have many near-tied logits.
``--cpu-kernels`` runs the int8 model's decode through the opt-in C kernels (dsvl2/model/cpu_kernels.py).
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


def compare(pipes: dict, batches: list, steps: int, kernels: bool) -> list[tuple[float, bool, float, bool]]:
    """Per batch: (cos int8/bf16, greedy int8 == bf16, cos bf16/fp32, greedy bf16 == fp32)."""
    from dsvl2.model import cpu_kernels

    out = []
    for batch in batches:
        logits, tokens = {}, {}
        for k, p in pipes.items():
            cpu_kernels.enable(kernels and k == "int8")
            logits[k], tokens[k] = last_logits(p, batch), greedy(p, batch, steps)
        cpu_kernels.enable(False)
        cos = torch.nn.functional.cosine_similarity
        out.append((cos(logits["int8"], logits["bf16"], dim=0).item(), tokens["int8"] == tokens["bf16"],
                    cos(logits["bf16"], logits["fp32"], dim=0).item(), tokens["bf16"] == tokens["fp32"]))
    return out


def three(ckpt) -> dict:
    return {"fp32": dsvl2.load(ckpt, dtype="fp32", device="cpu"),
            "bf16": dsvl2.load(ckpt, dtype="bf16", device="cpu"),
            "int8": dsvl2.load(ckpt, dtype="bf16", device="cpu", quantize="int8")}


def summary(name: str, rows: list, steps: int) -> None:
    n = len(rows)
    print(f"{name}: int8 vs bf16: min cosine {min(r[0] for r in rows):.5f}, cases >= 0.995: "
          f"{sum(r[0] >= 0.995 for r in rows)}/{n}, first {steps} greedy tokens identical: {sum(r[1] for r in rows)}/{n}")
    print(f"{name}: bf16 vs fp32: min cosine {min(r[2] for r in rows):.5f}, cases >= 0.995: "
          f"{sum(r[2] >= 0.995 for r in rows)}/{n}, first {steps} greedy tokens identical: {sum(r[3] for r in rows)}/{n}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--golden", type=Path, default=GOLDEN)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--demo", type=int, default=60, help="held-out demo prompts for the trained demo model (0: none)")
    ap.add_argument("--cpu-kernels", action="store_true", help="int8 decode through the opt-in C kernels")
    a = ap.parse_args()
    torch.set_num_threads(2)
    rows = []
    for structure in STRUCTURES:
        pipes = three(a.golden / "checkpoints" / structure)
        all_cases = cases(a.golden)
        batches = [pipes["bf16"].processor(conversation(a.golden, case)) for case in all_cases]
        rows += [(structure, case["id"], *r) for case, r in zip(all_cases, compare(pipes, batches, a.steps, a.cpu_kernels))]
    print(f"{'structure':<16} {'case':<22} {'cos int8/bf16':>13} {'greedy8 =':>9}   "
          f"{'cos bf16/fp32':>13} {'greedy8 =':>9}")
    for s, c, ci, gi, cb, gb in rows:
        print(f"{s:<16} {c:<22} {ci:13.5f} {gi!s:>9}   {cb:13.5f} {gb!s:>9}")
    summary("golden micro (random weights)", [r[2:] for r in rows], a.steps)
    if a.demo:
        from dsvl2.demo import default_model_dir
        from dsvl2.demo.build import EVAL_SEED
        from dsvl2.demo.tasks import generate as demo_samples

        pipes = three(default_model_dir())
        batches = [pipes["bf16"].processor([{"role": "user", "content": s.prompt, "images": [s.image]}])
                   for s in demo_samples(a.demo // 3, EVAL_SEED + 1)]
        summary(f"demo model (trained), {len(batches)} held-out prompts", compare(pipes, batches, a.steps,
                                                                                  a.cpu_kernels), a.steps)


if __name__ == "__main__":
    main()
