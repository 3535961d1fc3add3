"""Peak memory of a Base-dims model loaded with ``quantize="int4"``, measured on as many layers as fit, scaled.

    python bench/int4_memory.py [--preset base] [--layers 2 3] [--work /tmp/dsvl2-int4mem] [--keep]

For each layer count N, a random checkpoint of the preset's dims with N language layers is written
(bench/make_checkpoint.py; DeepSeek-VL2-Base has layer 0 dense and layers 1.. MoE), then a child process
loads it with ``dsvl2.load(dtype="bf16", quantize="int4")``, answers one image question (4 greedy tokens,
batch 1, the default plan) and reports its peak RSS. The growth from the smaller to the larger N is one MoE
layer; the full model's load peak is the larger run plus that growth for each missing layer, and the
answer's working set (peak after answering minus peak after loading, larger run) is added once. Beside
``dsvl2 info --quantize int4``'s estimate. Run under ``flock /tmp/dsvl2-big.lock`` on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def child(model: str) -> None:
    import dsvl2

    sys.path.insert(0, str(REPO / "bench"))
    from decode import sample_image

    pipe = dsvl2.load(model, dtype="bf16", device="cpu", quantize="int4")
    loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    out = pipe.complete("<image>\nWhich bar is the highest?", [sample_image()], max_new_tokens=4)
    print(json.dumps({"peak_after_load": loaded, "peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                      "tokens": len(out.token_ids), "plan": pipe.plan.describe()}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="base")
    ap.add_argument("--layers", type=int, nargs=2, default=[2, 3])
    ap.add_argument("--work", type=Path, default=Path("/tmp/dsvl2-int4mem"))
    ap.add_argument("--keep", action="store_true", help="keep the checkpoints")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        return child(a.child)
    from dsvl2.config import PRESETS

    full = PRESETS[a.preset].language_config.num_hidden_layers
    runs = {}
    for n in a.layers:
        ckpt = a.work / f"{a.preset}-{n}"
        if not (ckpt / "config.json").exists():
            subprocess.run([sys.executable, str(REPO / "bench" / "make_checkpoint.py"), "--preset", a.preset,
                            "--layers", str(n), "--out", str(ckpt)], check=True)
        text = subprocess.run([sys.executable, __file__, "--child", str(ckpt)], check=True, capture_output=True,
                              text=True, env={**os.environ, "OMP_NUM_THREADS": "2"}).stdout
        runs[n] = json.loads(text.strip().splitlines()[-1])
        print(f"{a.preset} dims, {n} layers, int4: peak RSS after load {runs[n]['peak_after_load'] / 1e9:.2f} GB, "
              f"after answering {runs[n]['peak'] / 1e9:.2f} GB ({runs[n]['tokens']} tokens; {runs[n]['plan']})")
        if not a.keep:
            shutil.rmtree(ckpt)
    lo, hi = a.layers
    # loading grows by one MoE layer's int4 bytes per layer; answering adds a working set on top (vision
    # activations, prefill temporaries) that does not grow with the layers: taken from the larger run
    per_layer = (runs[hi]["peak_after_load"] - runs[lo]["peak_after_load"]) / (hi - lo)
    load = runs[hi]["peak_after_load"] + (full - hi) * per_layer
    answer = max(0, runs[hi]["peak"] - runs[hi]["peak_after_load"])
    print(f"per MoE layer {per_layer / 1e9:.3f} GB -> {full} layers: load peak ~{load / 1e9:.1f} GB, with the "
          f"answer's working set (+{answer / 1e9:.2f} GB) ~{(load + answer) / 1e9:.1f} GB (scaled)")
    info = subprocess.run([sys.executable, "-m", "dsvl2.cli", "info", "--preset", a.preset, "--quantize", "int4",
                           "--json"], check=True, capture_output=True, text=True).stdout
    est = json.loads(info)
    print(f"dsvl2 info --preset {a.preset} --quantize int4: weights {est['weights_bytes_quantized'] / 1e9:.1f} GB, "
          f"load peak estimate {est['load_peak_bytes_estimate'] / 1e9:.1f} GB")


if __name__ == "__main__":
    main()
