"""Quality gate of int8 weight-only quantization on the golden cases (../shared/golden).

    python bench/quant_gate.py [--golden ../shared/golden] [--steps 8]

For each golden micro checkpoint (the three attention/router structures) and each of the 14 cases,
the bf16 model and the same checkpoint loaded with ``quantize="int8"`` are compared on:
- the cosine of the last prompt position's logits (gate: >= 0.995);
- greedy decoding: whether the first ``--steps`` tokens are identical (gate: most cases).
As a yardstick the same two numbers are printed for bf16 against fp32 (the precision the official
bf16 checkpoint already gives up), since random-weight micro models have many near-tied logits.
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--golden", type=Path, default=GOLDEN)
    ap.add_argument("--steps", type=int, default=8)
    a = ap.parse_args()
    torch.set_num_threads(2)
    rows = []
    for structure in STRUCTURES:
        ckpt = a.golden / "checkpoints" / structure
        pipes = {"fp32": dsvl2.load(ckpt, dtype="fp32", device="cpu"),
                 "bf16": dsvl2.load(ckpt, dtype="bf16", device="cpu"),
                 "int8": dsvl2.load(ckpt, dtype="bf16", device="cpu", quantize="int8")}
        for case in cases(a.golden):
            batch = pipes["bf16"].processor(conversation(a.golden, case))
            logits = {k: last_logits(p, batch) for k, p in pipes.items()}
            tokens = {k: greedy(p, batch, a.steps) for k, p in pipes.items()}
            cos = torch.nn.functional.cosine_similarity
            rows.append((structure, case["id"], cos(logits["int8"], logits["bf16"], dim=0).item(),
                         tokens["int8"] == tokens["bf16"], cos(logits["bf16"], logits["fp32"], dim=0).item(),
                         tokens["bf16"] == tokens["fp32"]))
    print(f"{'structure':<16} {'case':<22} {'cos int8/bf16':>13} {'greedy8 =':>9}   "
          f"{'cos bf16/fp32':>13} {'greedy8 =':>9}")
    for s, c, ci, gi, cb, gb in rows:
        print(f"{s:<16} {c:<22} {ci:13.5f} {gi!s:>9}   {cb:13.5f} {gb!s:>9}")
    n = len(rows)
    print(f"int8 vs bf16: min cosine {min(r[2] for r in rows):.5f}, cases >= 0.995: "
          f"{sum(r[2] >= 0.995 for r in rows)}/{n}, first {a.steps} greedy tokens identical: "
          f"{sum(r[3] for r in rows)}/{n}")
    print(f"bf16 vs fp32: min cosine {min(r[4] for r in rows):.5f}, cases >= 0.995: "
          f"{sum(r[4] >= 0.995 for r in rows)}/{n}, first {a.steps} greedy tokens identical: "
          f"{sum(r[5] for r in rows)}/{n}")


if __name__ == "__main__":
    main()
