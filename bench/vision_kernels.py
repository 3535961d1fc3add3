"""Vision tower with and without the opt-in CPU kernels (the ViT MLP's tanh-GELU), interleaved in one process.

    python bench/vision_kernels.py --model /work/ckpt/tiny [--tiles 5] [--rounds 4] [--threads 2]

Prints ms per tile for each round of each path, the medians, their ratio, and how far the kernel
path's features are from the torch path's (bf16, random tiles).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import dsvl2
from dsvl2.model import cpu_kernels
from dsvl2.model.plan import EXACT, Plan, apply


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="checkpoint directory (official layout)")
    ap.add_argument("--tiles", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    isa, why = cpu_kernels.host_isa()
    if isa is None:
        ap.error(f"the CPU kernels are unavailable on this machine: {why}")
    print(f"kernels: {isa} ({why})")
    model = dsvl2.load(a.model, dtype="bf16", exact=True).model
    fast = Plan(kernels=isa)
    size = model.cfg.vision_config.image_size
    tiles = torch.randn(a.tiles, 3, size, size, generator=torch.Generator().manual_seed(0)).bfloat16()
    times: dict[bool, list[float]] = {False: [], True: []}
    with torch.no_grad():
        ref = model.encode_tiles(tiles).float()
        diff = (apply(model, fast).encode_tiles(tiles).float() - ref).abs()
        for _ in range(a.rounds):
            for on in (False, True):
                apply(model, fast if on else EXACT)
                t = time.perf_counter()
                model.encode_tiles(tiles)
                times[on].append(time.perf_counter() - t)
    for on in (False, True):
        ms = [round(1000 * v / a.tiles) for v in times[on]]
        print(f"{'kernels' if on else 'torch':<8} ms/tile {ms} median {round(1000 * statistics.median(times[on]) / a.tiles)}")
    print(f"speedup (medians) {statistics.median(times[False]) / statistics.median(times[True]):.3f}")
    print(f"features: mean |kernels - torch| {diff.mean():.4f}, max {diff.max():.4f}")


if __name__ == "__main__":
    main()
