"""Inference speed against the machine's own limits, measured in one run.

    python bench/make_checkpoint.py --preset tiny --out /work/ckpt/tiny                 # full Tiny, random
    python bench/make_checkpoint.py --preset small --layers 4 --out /work/ckpt/small4   # MLA cache path
    python bench/decode.py --model /work/ckpt/tiny [--quantize int8] [--exact] [--compile] [--threads 2]
    DSVL2_CPU_ISA=avx2 python bench/decode.py ...    # the portable kernels (forced; any x86-64)
    python bench/decode.py --preset tiny --device cuda --json out.json   # random weights built on the GPU
    python bench/decode.py --preset small --layers 4 --device cuda [--compile] --json out.json

``--preset NAME [--layers N]`` instead of ``--model DIR``: the model of ``dsvl2.config.PRESETS`` is
built on the ``meta`` device, allocated in the load dtype on the target device and filled there by
``dsvl2.model.init.init_params_`` (its fixture recipe, with the draws made on the device), so no
checkpoint and no fp32 copy; the tokenizer comes from ``--tokenizer-from`` (default: ``$DSVL2_TOKENIZER``, else the
golden micro checkpoint in ``shared/`` inside or beside the repo, as ``make_checkpoint.py``).

Prints, from one process:
- the machine (in a child process, so the peak RSS below is the model's): read bandwidth (the
  faster of a 1 GiB fp32 sum and a BLAS dot of two such vectors), copy bandwidth (read + write),
  torch's GEMV speed over 1 GiB of rotating weights (bf16 through ``F.linear`` and ``torch.mv``, int8
  through ``_weight_int8pack_mm``: what decode can get from torch's kernels), a 4096^3 bf16 matmul;
- image preprocessing ms (one 640x480 image); vision+projector ms per tile (all tiles in one call)
  and its GFLOP/s; LLM prefill tokens/s and GFLOP/s on the 1-image prompt (~1060 tokens for Tiny);
- decode tokens/s at batch 1 and batch B (B distinct rows: the prompt with its last tokens replaced);
  KV-cache bytes per token (and, for MLA, the latent minimum); peak RSS;
- the batch-1 decode bound = read bandwidth / bytes read per token (activated weights in the load
  dtype, int8 + scales with --quantize, plus the KV cache of the prompt) and achieved/bound; the same
  bound with torch's best GEMV speed in place of the bandwidth; and the batch-B bound, counting the
  experts that B tokens touch on average under uniform routing.

``--device cuda``: the machine numbers are measured in this process on the GPU (read bandwidth = a
2 GiB fp32 sum / dot, copy = ``y.copy_(x)``, GEMV as on CPU with int8 reported as None where
``_weight_int8pack_mm`` has no kernel, an 8192^3 bf16 matmul), every timing synchronizes the device
before reading the clock, and the GPU name, ``peak_gpu_mem_GB`` (``max_memory_allocated`` since the
load; the model and the run) and ``gpu_mem_after_load_GB`` are added.

Timings are best-of-N. On a shared machine they drift with other processes: the load average is
printed at the start and the end. ``OMP_WAIT_POLICY=PASSIVE`` is set (unless already set) before
torch loads: with libgomp's default spin-waiting, two OpenMP threads competing with another busy
process lose most of their time slices in barriers (10x slower decode, measured).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

import dsvl2
from dsvl2.config import PRESETS
from dsvl2.generation.generate import (
    compiled_decode_one_token,
    decode_one_token,
    prefill,
)
from dsvl2.model.cache import make_cache
from dsvl2.model.init import FIXTURE_INIT, init_params_
from dsvl2.model.plan import apply as apply_plan
from dsvl2.model.plan import resolve as resolve_plan
from dsvl2.model.vlm import DSVL2
from dsvl2.pipeline import Pipeline, resolve_dtype
from dsvl2.processing.processor import Processor
from dsvl2.stats import count_parameters

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_checkpoint import GOLDEN_TOKENIZER, preset_config, write_processor_files

GIB = 1 << 30
REPO = Path(__file__).resolve().parents[1]
DEVICE = torch.device("cpu")  # where the run's tensors live; set once by main()


WARMUP_STEPS = 2  # decode steps run before the timed ones


def clock() -> float:
    """``time.perf_counter()`` once the device has finished the work queued so far (CUDA is asynchronous)."""
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)
    return time.perf_counter()


def best(fn, repeat: int = 3) -> float:
    """Fastest of ``repeat`` runs of ``fn()``, in seconds (device work included)."""
    out = float("inf")
    for _ in range(repeat):
        t = clock()
        fn()
        out = min(out, clock() - t)
    return out


def _read_and_copy() -> dict[str, float]:
    size = GIB if DEVICE.type == "cpu" else 2 * GIB  # each: far larger than the caches (CPU) / the L2 (GPU)
    x = torch.ones(size // 4, device=DEVICE)  # fp32
    y = torch.ones(size // 4, device=DEVICE)
    x.sum()
    torch.dot(x, y)
    out = {"read_sum_GBps": size / best(x.sum, 5) / 1e9,  # a reduction: the simplest streaming read
           "read_dot_GBps": 2 * size / best(lambda: torch.dot(x, y), 5) / 1e9}  # BLAS dot: two streams
    out["read_GBps"] = max(out["read_sum_GBps"], out["read_dot_GBps"])
    out["copy_GBps"] = 2 * size / best(lambda: y.copy_(x), 5) / 1e9  # bytes read + bytes written
    return out


def _gemv(kind: str) -> float:
    """GB/s of weights streamed by decode-shaped GEMVs (one row of 1280) over 1 GiB of distinct weights."""
    n, k = 8192, 1280
    v = torch.randn(1, k, device=DEVICE).to(torch.bfloat16)
    if kind == "int8":
        s = torch.rand(n, device=DEVICE).to(torch.bfloat16)
        qs = [torch.randint(-127, 128, (n, k), dtype=torch.int8, device=DEVICE) for _ in range(GIB // (n * k))]
        return GIB / best(lambda: [torch._weight_int8pack_mm(v, q, s) for q in qs], 3) / 1e9
    ws = [torch.randn(n, k, device=DEVICE).to(torch.bfloat16) for _ in range(GIB // (2 * n * k))]
    if kind == "mv":
        return GIB / best(lambda: [torch.mv(w, v[0]) for w in ws], 3) / 1e9
    return GIB / best(lambda: [F.linear(v, w) for w in ws], 3) / 1e9


def _matmul(dtype: torch.dtype, m: int = 4096) -> float:
    a, b = torch.randn(m, m, device=DEVICE).to(dtype), torch.randn(m, m, device=DEVICE).to(dtype)
    a @ b
    return 2 * m ** 3 / best(lambda: a @ b, 3 if DEVICE.type == "cpu" else 10) / 1e9


def machine(dtype: torch.dtype) -> dict[str, float | int | str | None]:
    """Bandwidth, torch GEMV speed (bf16 F.linear / torch.mv, int8) and a large matmul, measured on DEVICE."""
    out: dict[str, float | int | str | None] = dict(_read_and_copy())
    out.update(gemv_bf16_linear_GBps=_gemv("linear"), gemv_bf16_mv_GBps=_gemv("mv"))
    try:
        out["gemv_int8_GBps"] = _gemv("int8")
    except (RuntimeError, NotImplementedError) as e:  # e.g. no _weight_int8pack_mm kernel for this device
        out["gemv_int8_GBps"] = None
        out["gemv_int8_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
    if DEVICE.type == "cpu":
        out["matmul_GFLOPs"] = _matmul(dtype)
    else:  # 4096^3 is too small to reach a GPU's peak
        out.update(matmul_GFLOPs=_matmul(dtype, 8192), matmul_n=8192)
    return out


def machine_in_subprocess(threads: int) -> dict[str, float]:
    """The machine numbers from a child process, so that this process's peak RSS is the model's."""
    cmd = [sys.executable, __file__, "--machine-only", "--threads", str(threads), "--model", "-"]
    return json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)


class _DrawOn(torch.overrides.TorchFunctionMode):
    """Inside: ``torch.randn`` draws on ``device`` from a generator of its own seeded with ``seed``.

    So ``init_params_`` (whose rule stays the one source of truth) fills a model that already lives on
    ``device`` without fp32 copies on the host; on CPU the values equal plain
    ``init_params_(model, seed, **FIXTURE_INIT)``.
    """

    def __init__(self, device: torch.device, seed: int):
        super().__init__()
        self.device = device
        self.generator = torch.Generator(device=device).manual_seed(seed)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.randn:
            kwargs = dict(kwargs, device=self.device, generator=self.generator)
        return func(*args, **kwargs)


@torch.no_grad()
def random_model(cfg, dtype: torch.dtype, device: torch.device, seed: int = 0, quantize: str | None = None) -> DSVL2:
    """``DSVL2(cfg)`` with random weights, allocated once in ``dtype`` on ``device`` (as ``load_model`` does)."""
    from dsvl2.model import quant

    quant.check_mode(quantize)
    with torch.device("meta"):
        model = DSVL2(cfg)
    model = model.to(dtype).to_empty(device=device)  # every parameter in the load dtype, as load_model
    with _DrawOn(device, seed):
        init_params_(model, seed, **FIXTURE_INIT)
    # The non-persistent RoPE buffer: rebuilt in fp32 on the device, as after loading a checkpoint.
    model.language.model.rotary.reset_(device)
    if quantize:
        quant.quantize_model_(model, quantize)
    return model.eval()


def tokenizer_dir(arg: Path | None) -> Path:
    """``--tokenizer-from``, else $DSVL2_TOKENIZER, else the golden micro checkpoint inside or beside the repo."""
    env = os.environ.get("DSVL2_TOKENIZER")
    candidates = [arg] if arg else [Path(env)] if env else [
        REPO / "shared" / "golden" / "checkpoints" / "micro-mha", GOLDEN_TOKENIZER]
    for c in candidates:
        if (c / "tokenizer.json").is_file():
            return c
    raise SystemExit(f"no tokenizer.json in {[str(c) for c in candidates]}: pass --tokenizer-from DIR (a folder with "
                     "tokenizer.json, special_tokens_map.json, processor_config.json, e.g. a copy of "
                     "../shared/golden/checkpoints/micro-mha) or set DSVL2_TOKENIZER")


def random_pipeline(preset: str, layers: int | None, dtype: torch.dtype, device: torch.device,
                    tokenizer_from: Path | None, quantize: str | None) -> Pipeline:
    """The Pipeline of a random-weight preset model on ``device`` and the processor make_checkpoint.py writes."""
    cfg = preset_config(preset, layers)
    with tempfile.TemporaryDirectory() as d:
        write_processor_files(cfg, Path(d), tokenizer_dir(tokenizer_from))
        processor = Processor.from_pretrained(d)
    return Pipeline(random_model(cfg, dtype, device, quantize=quantize), processor, None)


def sample_image(w: int = 640, h: int = 480) -> Image.Image:
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    for i, v in enumerate([3, 7, 5, 9]):
        d.rectangle([60 + i * 140, h - 40 - v * 40, 140 + i * 140, h - 40], fill=(40 * i, 90, 200))
    return img


def vision_flops(cfg, tiles: int) -> float:
    v = cfg.vision_config
    counts = count_parameters(cfg)
    linear = 2 * counts.vision * v.num_patches + 2 * counts.projector * (cfg.grid ** 2)
    attention = 4 * v.layers * v.num_patches ** 2 * v.width  # scores and weighted sum
    return tiles * (linear + attention)


def prefill_flops(cfg, t: int) -> float:
    lc = cfg.language_config
    counts = count_parameters(cfg)
    per_token = counts.decode_read - counts.lm_head - counts.routers
    head = (lc.qk_nope_head_dim + lc.qk_rope_head_dim + lc.v_head_dim) if lc.use_mla else 2 * lc.head_dim
    attention = lc.num_hidden_layers * t * t * lc.num_attention_heads * head  # causal half of 2*T^2*...
    return 2 * per_token * t + 2 * counts.lm_head + attention


def weight_bytes_per_token(pipe, batch: int = 1) -> float:
    """Bytes of language-model weights one decode step reads at ``batch`` rows (uniform routing)."""
    lc = pipe.model.cfg.language_config
    experts_bytes = shared = 0
    for name, t in list(pipe.model.language.named_parameters()) + list(pipe.model.language.named_buffers()):
        size = t.numel() * t.element_size()
        if "embed_tokens" in name or "rotary" in name:
            continue
        if ".mlp.experts." in name:
            experts_bytes += size
        else:
            shared += size
    if lc.n_routed_experts:
        e, k = lc.n_routed_experts, lc.num_experts_per_tok
        touched = e * (1 - (1 - k / e) ** batch)  # expected distinct experts per MoE layer
        experts_bytes *= touched / e
    embed = pipe.model.language.model.embed_tokens.weight
    return shared + experts_bytes + batch * embed.shape[1] * embed.element_size()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    which = ap.add_mutually_exclusive_group(required=True)
    which.add_argument("--model", help="checkpoint directory (official layout)")
    which.add_argument("--preset", choices=sorted(PRESETS), help="random weights built in memory, no checkpoint")
    ap.add_argument("--layers", type=int, default=None, help="with --preset: that many language-model layers")
    ap.add_argument("--tokenizer-from", type=Path, default=None,
                    help="with --preset: folder with tokenizer.json (default: $DSVL2_TOKENIZER or ../shared/golden)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--quantize", default=None, choices=[None, "int8", "int4"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--compile", action="store_true", help="decode through torch.compile")
    ap.add_argument("--exact", action="store_true",
                    help="the exact plan (every op in its reference form) instead of the fast plan for this machine")
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    ap.add_argument("--machine-only", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.layers is not None and a.preset is None:
        ap.error("--layers needs --preset")
    if a.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda, but torch.cuda.is_available() is False")
    global DEVICE
    DEVICE = dev = torch.device("cuda", torch.cuda.current_device()) if a.device == "cuda" else torch.device("cpu")
    torch.set_num_threads(a.threads)  # CPU work only (harmless on cuda: preprocessing, host glue)
    torch.manual_seed(0)
    if a.machine_only:
        print(json.dumps(machine(torch.bfloat16)))
        return
    name = a.model if a.model else f"random:{a.preset}" + (f"(layers={a.layers})" if a.layers else "")
    r: dict[str, float | str | None] = {"model": name, "threads": a.threads,
                                        "omp_wait_policy": os.environ["OMP_WAIT_POLICY"],
                                        "loadavg_start": os.getloadavg()[0], "quantize": str(a.quantize),
                                        "compile": str(a.compile)}
    if dev.type == "cuda":
        r.update(device="cuda", gpu_name=torch.cuda.get_device_name(dev))
        r.update(machine(torch.bfloat16))  # in process: host RSS is not what is measured on a GPU
        torch.cuda.empty_cache()  # give the machine numbers' buffers back before the model is allocated
    else:
        r.update(machine_in_subprocess(a.threads))

    t = clock()
    if a.model:
        pipe = dsvl2.load(a.model, dtype=a.dtype, device=str(dev), quantize=a.quantize, exact=a.exact)
    else:
        pipe = random_pipeline(a.preset, a.layers, resolve_dtype(a.dtype), dev, a.tokenizer_from, a.quantize)
        apply_plan(pipe.model, resolve_plan(dev, pipe.model.dtype, a.exact))
    r["plan"] = pipe.plan.describe()
    r["load_s"] = clock() - t
    r["rss_after_load_GB"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9
    if dev.type == "cuda":  # the peak below: the model + the run, not the loader's or the init's temporaries
        r["gpu_mem_after_load_GB"] = torch.cuda.memory_allocated(dev) / 1e9
        torch.cuda.reset_peak_memory_stats(dev)
    model, cfg = pipe.model, pipe.model.cfg
    lc = cfg.language_config

    conv = [{"role": "user", "content": "<image>\nWhich bar is the highest?", "images": [sample_image()]}]
    r["preprocess_ms"] = 1000 * best(lambda: pipe.processor(conv), 3)
    batch = pipe.processor(conv)
    if int(batch.input_ids.max()) >= lc.vocab_size:
        # The tokenizer beside a random checkpoint is DeepSeek-V3's (Tiny/Base ids, <image> = 128815);
        # a Small-shaped model has 102400 rows. Random weights: only shapes matter, so fold the ids.
        batch.input_ids = batch.input_ids.remainder(lc.vocab_size)
        r["token_ids_folded_into_vocab"] = "True"
    batch = batch.to(dev)
    n_tiles = int(sum(1 + w * h for w, h in batch.images_spatial_crop[0].tolist() if w))
    tiles = batch.images[0, :n_tiles]
    with torch.no_grad():
        vis = best(lambda: model.encode_tiles(tiles), 2)
        embeds = model.prepare_inputs_embeds(batch.input_ids, batch.images, batch.images_seq_mask,
                                             batch.images_spatial_crop)
    r.update(tiles=n_tiles, vision_ms_per_tile=1000 * vis / n_tiles,
             vision_GFLOPs=vision_flops(cfg, n_tiles) / vis / 1e9)

    t_prompt = embeds.shape[1]
    mask = batch.attention_mask.bool()
    total = t_prompt + a.decode_tokens + WARMUP_STEPS + 1

    def run_prefill(e: torch.Tensor, m: torch.Tensor):
        cache = make_cache(lc, e.shape[0], total, model.dtype, dev)
        return cache, prefill(model, e, m, cache)

    pre = best(lambda: run_prefill(embeds, mask), 2)
    r.update(prompt_tokens=t_prompt, prefill_tok_per_s=t_prompt / pre,
             prefill_GFLOPs=prefill_flops(cfg, t_prompt) / pre / 1e9)

    step = compiled_decode_one_token() if a.compile else decode_one_token

    def decode_rate(b: int) -> tuple[float, float]:
        e = embeds.expand(b, -1, -1).clone()
        g = torch.Generator().manual_seed(b)  # on the host: the same ids whatever the device
        with torch.no_grad():  # distinct rows: the last 6 prompt tokens replaced (row 0 kept)
            ids = torch.randint(1000, 100000, (b, 6), generator=g).to(dev)
            e[1:, -6:] = model.language.model.embed_tokens(ids[1:])
        m = mask.expand(b, -1).clone()
        cache, logits = run_prefill(e, m)
        tok = logits.argmax(-1)
        if a.compile:  # compile (and its recompilations) outside the timed loop
            t0 = clock()
            c2 = make_cache(lc, b, total, model.dtype, dev)
            c2.length = cache.length
            mm = m
            for _ in range(3):
                mm = torch.cat([mm, torch.ones(b, 1, dtype=torch.bool, device=dev)], dim=1)
                step(model, tok, mm, c2, None, False)
            r[f"compile_s_b{b}"] = clock() - t0
            del c2
        for i in range(a.decode_tokens + WARMUP_STEPS):
            if i == WARMUP_STEPS:  # first steps untimed: one-time allocations, idle threads waking
                t0 = clock()
            m = torch.cat([m, torch.ones(b, 1, dtype=torch.bool, device=dev)], dim=1)
            tok = step(model, tok, m, cache, None, False).argmax(-1)
        return b * a.decode_tokens / (clock() - t0), cache.bytes_per_token

    r["decode_tok_per_s_b1"], kv = decode_rate(1)
    r[f"decode_tok_per_s_b{a.batch}"], _ = decode_rate(a.batch)
    r["kv_bytes_per_token"] = kv
    if lc.use_mla:
        r["kv_latent_minimum_bytes"] = lc.num_hidden_layers * lc.cache_values_per_token * model.dtype.itemsize
    r["peak_rss_GB"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9
    if dev.type == "cuda":
        r["peak_gpu_mem_GB"] = torch.cuda.max_memory_allocated(dev) / 1e9
    r["loadavg_end"] = os.getloadavg()[0]

    kv_read = kv * (t_prompt + a.decode_tokens // 2)  # average cache length while decoding
    read1 = weight_bytes_per_token(pipe, 1) + kv_read
    readb = weight_bytes_per_token(pipe, a.batch) + a.batch * kv_read
    gemv = r["gemv_int8_GBps"] if a.quantize else r["gemv_bf16_mv_GBps"]  # None: no int8 kernel here
    r["bytes_read_per_token_GB"] = read1 / 1e9
    r["decode_bound_b1_tok_per_s"] = r["read_GBps"] * 1e9 / read1
    r["decode_b1_vs_bound"] = r["decode_tok_per_s_b1"] / r["decode_bound_b1_tok_per_s"]
    r["decode_gemv_bound_b1_tok_per_s"] = None if gemv is None else gemv * 1e9 / read1
    r["decode_b1_vs_gemv_bound"] = None if gemv is None else r["decode_tok_per_s_b1"] / r["decode_gemv_bound_b1_tok_per_s"]
    r[f"bytes_read_per_step_b{a.batch}_GB"] = readb / 1e9
    r[f"decode_bound_b{a.batch}_tok_per_s"] = a.batch * r["read_GBps"] * 1e9 / readb
    r[f"decode_b{a.batch}_vs_b1"] = r[f"decode_tok_per_s_b{a.batch}"] / r["decode_tok_per_s_b1"]
    r[f"bound_b{a.batch}_vs_b1"] = r[f"decode_bound_b{a.batch}_tok_per_s"] / r["decode_bound_b1_tok_per_s"]
    r["prefill_vs_matmul"] = r["prefill_GFLOPs"] / r["matmul_GFLOPs"]
    r["vision_vs_matmul"] = r["vision_GFLOPs"] / r["matmul_GFLOPs"]
    width = max(map(len, r))
    for k, v in r.items():
        print(f"{k:<{width}}  {v:.4g}" if isinstance(v, float) else f"{k:<{width}}  {v}")
    if a.json:
        a.json.write_text(json.dumps(r, indent=2))


if __name__ == "__main__":
    main()
