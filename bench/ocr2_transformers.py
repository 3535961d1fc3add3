"""transformers' side of bench/ocr2.py: run in the transformers >= 5.23 venv (see scripts/make_ocr2_fixtures.py).

    /tmp/venv-tf5/bin/python bench/ocr2_transformers.py DIR --tokens 64 --threads 2 --lm-layers 12

Loads the official-layout checkpoint in DIR through ``DeepseekOcr2ForConditionalGeneration`` (bf16),
takes the exact inputs dsvl2's processor wrote (``DIR/bench_inputs.safetensors``: ids with BOS, global
views, tiles) and, after one warm-up call, times ``--repeats`` greedy generations of 1 + N tokens with a
timestamp per step (a logits processor): first token (vision + prefill) and decode rate, best of.
Prints one JSON line.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT / "tests"))
from make_ocr2_fixtures import transformers_config  # noqa: E402
from reference import ocr2_checkpoint as oc  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("dir")
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--lm-layers", type=int, default=12)
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    from transformers import DeepseekOcr2ForConditionalGeneration

    inp = load_file(str(Path(a.dir) / "bench_inputs.safetensors"))
    dims = {**oc.REAL_DIMS, "lm_layers": a.lm_layers}
    cfg = transformers_config(dims, image_token_id=int(inp["image_token_id"]))
    t = time.perf_counter()
    model, info = DeepseekOcr2ForConditionalGeneration.from_pretrained(
        a.dir, config=cfg, dtype=torch.bfloat16, output_loading_info=True)
    load_s = time.perf_counter() - t
    assert not any(info.values()), info
    model.eval()
    ids = inp["input_ids"]
    kw = dict(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=inp["global_views"].bfloat16(),
              pixel_values_local=inp["tiles"].bfloat16() if inp["tiles"].numel() else None,
              num_local_patches=[inp["tiles"].shape[0]], do_sample=False)
    from transformers import LogitsProcessor, LogitsProcessorList

    class Stamps(LogitsProcessor):
        """Called once per generation step, right after that step's forward."""

        def __init__(self) -> None:
            self.times: list[float] = []

        def __call__(self, input_ids, scores):
            self.times.append(time.perf_counter())
            return scores

    def run(n: int) -> dict:
        stamps = Stamps()
        start = time.perf_counter()
        out = model.generate(**kw, max_new_tokens=n, min_new_tokens=n, logits_processor=LogitsProcessorList([stamps]))
        t = stamps.times
        return {"first_token_s": t[0] - start, "decode_tok_s": (n - 1) / (t[-1] - t[0]),
                "tokens": out[0, ids.shape[1]:].tolist()}

    with torch.no_grad():
        run(2)  # warm-up, as on dsvl2's side
        runs = [run(1 + a.tokens) for _ in range(a.repeats)]
    best = {"first_token_s": min(r["first_token_s"] for r in runs), "decode_tok_s": max(r["decode_tok_s"] for r in runs),
            "tokens": runs[0]["tokens"], "all_first_token_s": [r["first_token_s"] for r in runs],
            "all_decode_tok_s": [r["decode_tok_s"] for r in runs]}
    print(json.dumps(best | {"load_s": load_s, "transformers": __import__("transformers").__version__,
                             "peak_rss_GB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}))


if __name__ == "__main__":
    main()
