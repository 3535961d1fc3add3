"""transformers' side of bench/ocr2.py: run in the transformers >= 5.23 venv (see scripts/make_ocr2_fixtures.py).

    /tmp/venv-tf5/bin/python bench/ocr2_transformers.py DIR --tokens 64 --threads 2 --lm-layers 12

Loads the official-layout checkpoint in DIR through ``DeepseekOcr2ForConditionalGeneration`` (bf16),
takes the exact inputs dsvl2's processor wrote (``DIR/bench_inputs.safetensors``: ids with BOS, global
views, tiles) and, after one warm-up call, times ``generate`` for 1 token (vision + prefill) and for
1 + N tokens, greedy.
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
    with torch.no_grad():
        model.generate(**kw, max_new_tokens=1, min_new_tokens=1)  # warm-up, as on dsvl2's side
        t = time.perf_counter()
        model.generate(**kw, max_new_tokens=1, min_new_tokens=1)
        first = time.perf_counter() - t
        t = time.perf_counter()
        out = model.generate(**kw, max_new_tokens=1 + a.tokens, min_new_tokens=1 + a.tokens)
        total = time.perf_counter() - t
    print(json.dumps({"load_s": load_s, "first_token_s": first, "total_s": total,
                      "new_tokens": out.shape[1] - ids.shape[1], "tokens": out[0, ids.shape[1]:].tolist(),
                      "peak_rss_GB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
                      "transformers": __import__("transformers").__version__}))


if __name__ == "__main__":
    main()
