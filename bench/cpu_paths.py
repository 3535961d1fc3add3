"""The issue-14 target table: every CPU path of one model, side by side, measured in one run.

    flock /tmp/dsvl2-big.lock python bench/cpu_paths.py [--preset tiny] [--quantize none int8 int4] [--tokens 16]

Full Tiny dims with random weights (built in memory as bench/decode.py's ``--preset``), one 640x480
image (5 tiles, ~1,060-token prompt). One child process per weight dtype (bf16, int8, int4: the same
random model, quantized in memory) and per machine: ``native`` (this CPU as it is) and ``portable``
(an AVX2-only CPU emulated: ``DSVL2_CPU_ISA=avx2`` for dsvl2's kernels and ``ATEN_CPU_CAPABILITY=avx2
ONEDNN_MAX_CPU_ISA=AVX2`` for torch's, so bf16 GEMMs lose their native support as on AMD Zen 3; the memory
system stays this machine's). In each child two plans run on the same model and prompt: ``exact`` (torch
only) and ``fast`` (what ``dsvl2.load`` resolves there; on the portable machine that includes fp32
GEMMs for vision and prefill). Printed per row:
- batch-1 decode tokens/s (rounds interleaved across plans, after warm-up steps) and its share of the
  bound of the weight dtype in use = read bandwidth (measured in the same process) / bytes read per token
  (activated weights + the KV cache); the bf16 and int8 bounds of the same model are printed beside, and
  the share of the GEMV-streaming bound: the same bytes at the best GB/s a batch-1 bf16 GEMV streams here
  (torch.mv or dsvl2's kernel over 1 GiB of 8192 x 1280 matrices), which on a 2-core VM is below the fp32
  read bandwidth (one core streams ~12-15 GB/s);
- vision (5 tiles) + prefill seconds under that plan, against the fp32 torch time of the same GEMM shapes
  (every linear and grouped-expert product that vision + prefill run, recorded by hooks, replayed as
  fp32 ``torch.matmul`` on random data): the target is <= 2x;
and int4 / int8 decode per plan. The CPU model and the load average are printed first and last.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see bench/decode.py

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import decode as bench  # noqa: E402  (bench/decode.py: random model, machine numbers, bytes per token)

from dsvl2.generation.generate import decode_one_token, prefill  # noqa: E402
from dsvl2.model import cpu_kernels  # noqa: E402
from dsvl2.model.cache import make_cache  # noqa: E402
from dsvl2.model.plan import EXACT, apply, resolve  # noqa: E402


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


class RecordGemms(torch.overrides.TorchFunctionMode):
    """Inside: the (rows, in, out) of every weight product: ``F.linear`` calls (modules, the plan's widened
    fp32 forms, dequantized int8 / int4), and ``torch._grouped_mm`` (the experts' grouped GEMMs) as one product
    per expert with an even share of the rows. Whatever form the plan picks, the same shapes."""

    def __init__(self):
        super().__init__()
        self.shapes: list[tuple[int, int, int]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.nn.functional.linear:
            x, w = args[0], args[1]
            self.shapes.append((x.numel() // x.shape[-1], w.shape[1], w.shape[0]))
        elif func is getattr(torch, "_grouped_mm", None):
            a, b = args[0], args[1]
            if a.dim() == 2 and b.dim() == 3:  # rows (N, D) @ weights (E, D, O): the row form
                e = b.shape[0]
                self.shapes.extend([(max(1, a.shape[0] // e), b.shape[1], b.shape[2])] * e)
            elif a.dim() == 3:  # the column form: weights (E, O, D) @ columns (D, N)
                e = a.shape[0]
                self.shapes.extend([(max(1, b.shape[-1] // e), a.shape[2], a.shape[1])] * e)
        return func(*args, **kwargs)


def record_gemms(run) -> list[tuple[int, int, int]]:
    with RecordGemms() as rec:
        run()
    return rec.shapes


def fp32_gemm_seconds(shapes: list[tuple[int, int, int]]) -> float:
    """Best of two: the fp32 ``torch.matmul`` time of ``shapes`` on random data (weights reused per shape)."""
    cache: dict[tuple[int, int, int], tuple[torch.Tensor, torch.Tensor]] = {}
    for s in set(shapes):
        cache[s] = (torch.randn(s[0], s[1]), torch.randn(s[1], s[2]))

    def run():
        for s in shapes:
            a, b = cache[s]
            torch.matmul(a, b)
    return bench.best(run, 2)


def gemv_streaming() -> float:
    """The fastest bf16 weight streaming a batch-1 GEMV reaches here: GB/s of decode-shaped GEMVs (8192 x 1280)
    over 1 GiB of distinct weights, the best of torch.mv and dsvl2's kernel (the build this machine selects).
    Decode is a chain of such GEMVs, so this, not the fp32 read bandwidth, is what batch-1 decode can reach."""
    n, k = 8192, 1280
    ws = [torch.randn(n, k).bfloat16() for _ in range(bench.GIB // (2 * n * k))]
    v = torch.randn(k).bfloat16()
    isa = cpu_kernels.host_isa()[0]
    gemvs = [torch.mv] + ([lambda w, x: cpu_kernels.gemv(w, x, isa)] if isa else [])
    return max(bench.GIB / bench.best(lambda: [f(w, v) for w in ws], 3) / 1e9 for f in gemvs)


def child(a: argparse.Namespace) -> None:
    torch.set_num_threads(a.threads)
    quantize = None if a.child == "none" else a.child
    out: dict = {"quantize": a.child, "loadavg_start": os.getloadavg()[0]}
    out.update(bench._read_and_copy())
    out["gemv_GBps"] = gemv_streaming()
    pipe = bench.random_pipeline(a.preset, None, torch.bfloat16, torch.device("cpu"), None, quantize)
    model, lc = pipe.model, pipe.model.cfg.language_config
    conv = [{"role": "user", "content": "<image>\nWhich bar is the highest?", "images": [bench.sample_image()]}]
    batch = pipe.processor(conv)
    batch.input_ids = batch.input_ids.remainder(lc.vocab_size)
    n_tiles = int(sum(1 + w * h for w, h in batch.images_spatial_crop[0].tolist() if w))
    mask = batch.attention_mask.bool()
    t = batch.input_ids.shape[1]
    cache = make_cache(lc, 1, t + a.rounds * a.tokens + 8, model.dtype, "cpu")
    fast = resolve("cpu", torch.bfloat16)
    out["plan"] = fast.describe()
    plans = {"fast": fast, "exact": EXACT}

    def vision_prefill():
        with torch.no_grad():
            embeds = model.prepare_inputs_embeds(batch.input_ids, batch.images, batch.images_seq_mask,
                                                 batch.images_spatial_crop)
            cache.length = 0
            cache.logits = prefill(model, embeds, mask, cache)

    rows = {}
    for name, plan in plans.items():  # the exact plan's vision + prefill only with bf16 weights (slow, once)
        apply(model, plan)
        t0 = time.perf_counter()
        if name == "fast":
            shapes = record_gemms(vision_prefill)  # the interception costs little next to the GEMMs
            logits = cache.logits
        elif quantize is None and a.exact_prefill:
            vision_prefill()
        rows[name] = {"vision_prefill_s": time.perf_counter() - t0 if name == "fast" or (
            quantize is None and a.exact_prefill) else float("nan"), "rates": []}
    out.update(tiles=n_tiles, prompt_tokens=t, gemm_count=len(shapes), fp32_gemm_s=fp32_gemm_seconds(shapes))
    token = logits.argmax(-1)
    for _ in range(a.rounds):  # decode rounds interleaved across plans, each from the same prompt cache
        for name, plan in plans.items():
            apply(model, plan)
            cache.length = t
            m = torch.cat([mask, torch.ones(1, 2 + a.tokens, dtype=torch.bool)], dim=1)
            tok = token
            with torch.no_grad():
                for i in range(2 + a.tokens):
                    if i == 2:
                        t0 = time.perf_counter()
                    tok = decode_one_token(model, tok, m[:, :t + i + 1], cache, None, False).argmax(-1)
            rows[name]["rates"].append(a.tokens / (time.perf_counter() - t0))
    kv = cache.bytes_per_token * (t + a.tokens // 2)
    out["bytes_per_token"] = bench.weight_bytes_per_token(pipe, 1) + kv
    out["rows"] = {k: {"decode_tok_s": max(v["rates"]), "vision_prefill_s": v["vision_prefill_s"]}
                   for k, v in rows.items()}
    out["loadavg_end"] = os.getloadavg()[0]
    print(json.dumps(out))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--quantize", nargs="+", default=["none", "int8", "int4"])
    ap.add_argument("--machines", nargs="+", default=["native", "portable"])
    ap.add_argument("--no-exact-prefill", dest="exact_prefill", action="store_false",
                    help="skip the exact plan's vision + prefill (minutes on the emulated AVX2 machine)")
    ap.add_argument("--tokens", type=int, default=16, help="timed decode steps per round")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        return child(a)
    print(f"CPU: {cpu_name()}; host kernel builds {cpu_kernels.cpu_isas()}; threads {a.threads}; "
          f"loadavg {os.getloadavg()}; torch {torch.__version__}; machine shared with other jobs")
    envs = {"native": {}, "portable": {"DSVL2_CPU_ISA": "avx2", "ATEN_CPU_CAPABILITY": "avx2",
                                       "ONEDNN_MAX_CPU_ISA": "AVX2"}}
    res = {}
    for machine in a.machines:
        for q in a.quantize:
            cmd = [sys.executable, __file__, "--child", q, "--preset", a.preset, "--tokens", str(a.tokens),
                   "--rounds", str(a.rounds), "--threads", str(a.threads)] + ([] if a.exact_prefill else
                                                                               ["--no-exact-prefill"])
            text = subprocess.run(cmd, check=True, capture_output=True, text=True,
                                  env={**os.environ, **envs[machine]}).stdout
            res[machine, q] = json.loads(text.splitlines()[-1])
            r = res[machine, q]
            print(f"{machine} {q}: fast plan = {r['plan']}; read {r['read_GBps']:.1f} GB/s; best bf16 GEMV streaming "
                  f"{r['gemv_GBps']:.1f} GB/s; "
                  f"{r['bytes_per_token'] / 1e9:.3f} GB read per token; vision {r['tiles']} tiles + prefill "
                  f"{r['prompt_tokens']} tokens = {r['gemm_count']} GEMMs, {r['fp32_gemm_s']:.1f} s in fp32 torch; "
                  f"loadavg {r['loadavg_start']:.2f} -> {r['loadavg_end']:.2f}", flush=True)
    print("| machine | weights | plan | decode tok/s | bound (this dtype) | % of bound | % of GEMV-streaming bound | "
          "bf16 bound | int8 bound | vision+prefill s | / fp32 same-shape GEMMs |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for (machine, q), r in res.items():
        bound = r["read_GBps"] * 1e9 / r["bytes_per_token"]
        other = {k: res.get((machine, k)) for k in ("none", "int8")}
        b16, b8 = (o["read_GBps"] * 1e9 / o["bytes_per_token"] if o else float("nan") for o in other.values())
        for name, row in r["rows"].items():
            gemv_bound = r["gemv_GBps"] * 1e9 / r["bytes_per_token"]
            print(f"| {machine} | {'bf16' if q == 'none' else q} | {name} | {row['decode_tok_s']:.2f} | {bound:.1f} | "
                  f"{100 * row['decode_tok_s'] / bound:.0f} % | {100 * row['decode_tok_s'] / gemv_bound:.0f} % | "
                  f"{b16:.1f} | {b8:.1f} | {row['vision_prefill_s']:.1f} | "
                  f"{row['vision_prefill_s'] / r['fp32_gemm_s']:.2f}x |")
    for machine in a.machines:
        if (machine, "int8") in res and (machine, "int4") in res:
            i8, i4 = res[machine, "int8"]["rows"], res[machine, "int4"]["rows"]
            print(f"{machine}: int4 / int8 decode: " + ", ".join(
                f"{k} {i4[k]['decode_tok_s'] / i8[k]['decode_tok_s']:.2f}x" for k in i8))
    print(f"loadavg at the end {os.getloadavg()}")


if __name__ == "__main__":
    main()
