"""Write a checkpoint in the official Hugging Face layout with random weights, for any preset.

    python bench/make_checkpoint.py --preset tiny --out /tmp/dsvl2-tiny [--layers N] [--dtype bf16]

The weights are drawn tensor by tensor (the initialisation of ``dsvl2.model.init``) and streamed
into the safetensors file, so a 3.37B-parameter Tiny needs about one tensor of memory, not the model.
The tokenizer files are copied from ``--tokenizer-from`` (default: the golden micro checkpoint beside
the repo, whose ids fit the Tiny/Base vocabulary). ``--layers`` shortens the language model (e.g. a
Small-shaped model that fits in memory).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import struct
import sys
import time
from pathlib import Path

import torch

from dsvl2.checkpoint import INDEX_NAME, iter_official_tensors
from dsvl2.config import PRESETS
from dsvl2.model.init import FIXTURE_INIT, init_params_
from dsvl2.model.vlm import DSVL2
from dsvl2.pipeline import resolve_dtype

GOLDEN_TOKENIZER = Path(__file__).resolve().parents[2] / "shared" / "golden" / "checkpoints" / "micro-mha"
_NAMES = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}


def preset_config(preset: str, layers: int | None = None):
    """``PRESETS[preset]``, with the language model shortened to ``layers`` layers if given."""
    cfg = PRESETS[preset]
    if layers:
        cfg = dataclasses.replace(cfg, language_config=dataclasses.replace(cfg.language_config, num_hidden_layers=layers))
    return cfg


def write_processor_files(cfg, out: Path, tokenizer_from: Path) -> None:
    """The tokenizer files of ``tokenizer_from`` and a ``processor_config.json`` fitted to ``cfg``, into ``out``."""
    for fname in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        src = tokenizer_from / fname
        if src.is_file():
            shutil.copy(src, out / fname)
    proc = tokenizer_from / "processor_config.json"
    proc_cfg = json.loads(proc.read_text()) if proc.is_file() else {}
    proc_cfg.update(candidate_resolutions=[list(r) for r in cfg.candidate_resolutions],
                    patch_size=cfg.vision_config.patch_size, downsample_ratio=cfg.projector_config.downsample_ratio)
    (out / "processor_config.json").write_text(json.dumps(proc_cfg, indent=2))


def build(preset: str, out: Path, dtype: torch.dtype, layers: int | None, seed: int, tokenizer_from: Path) -> None:
    cfg = preset_config(preset, layers)
    out.mkdir(parents=True, exist_ok=True)
    cfg.save(out)
    with torch.device("meta"):
        model = DSVL2(cfg)
    specs = [(k, tuple(t.shape)) for k, t in iter_official_tensors(model)] + attn_pool_specs(cfg)
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for key, shape in specs:
        n = dtype.itemsize * (torch.Size(shape).numel())
        header[key] = {"dtype": _NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * ((8 - len(raw) % 8) % 8)
    name = "model-00001-of-000001.safetensors"
    params = dict(model.named_parameters())
    t0 = time.time()
    with open(out / name, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for i, (key, shape) in enumerate(specs):
            # Draw each official tensor with the init rule of the parameter it belongs to.
            ours = _our_name(key)
            holder = torch.nn.Module()
            holder.register_parameter(ours.replace(".", "_"), torch.nn.Parameter(torch.empty(shape)))
            probe = {ours: holder._parameters[ours.replace(".", "_")]}
            _init_named(probe, seed + i)
            t = probe[ours].detach().to(dtype).contiguous()
            f.write(memoryview(t.view(-1).view(torch.uint8).numpy()))
            if i % 50 == 0:
                print(f"  {i}/{len(specs)} tensors, {time.time() - t0:.0f}s", file=sys.stderr)
    del params
    index = {"metadata": {"total_size": offset}, "weight_map": {k: name for k, _ in specs}}
    (out / INDEX_NAME).write_text(json.dumps(index, indent=2))
    write_processor_files(cfg, out, tokenizer_from)
    print(f"wrote {out} ({offset / 1e9:.2f} GB, {len(specs)} tensors) in {time.time() - t0:.0f}s")


def attn_pool_specs(cfg) -> list[tuple[str, tuple[int, ...]]]:
    """The SigLIP pooling head the released checkpoints carry but DeepSeek-VL2 never runs (spec §2.4)."""
    w, m = cfg.vision_config.width, cfg.vision_config.mlp_dim
    p = "vision.attn_pool."
    return [(p + "latent", (1, 1, w)), (p + "q.weight", (w, w)), (p + "q.bias", (w,)), (p + "kv.weight", (2 * w, w)),
            (p + "kv.bias", (2 * w,)), (p + "proj.weight", (w, w)), (p + "proj.bias", (w,)),
            (p + "norm.weight", (w,)), (p + "norm.bias", (w,)), (p + "mlp.fc1.weight", (m, w)),
            (p + "mlp.fc1.bias", (m,)), (p + "mlp.fc2.weight", (w, m)), (p + "mlp.fc2.bias", (w,))]


def _our_name(official: str) -> str:
    if official == "view_seperator":
        return "view_separator"
    parts = official.split(".")
    if ".mlp.experts." in official and parts[-1] == "weight":  # ...experts.{j}.gate_proj.weight
        return ".".join(parts[:-3] + [parts[-2]])
    return official


def _init_named(params: dict[str, torch.nn.Parameter], seed: int) -> None:
    class Named(torch.nn.Module):
        def named_parameters(self, *a, **k):
            return iter(params.items())

    init_params_(Named(), seed, **FIXTURE_INIT)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tokenizer-from", type=Path, default=GOLDEN_TOKENIZER)
    a = ap.parse_args()
    build(a.preset, a.out, resolve_dtype(a.dtype), a.layers, a.seed, a.tokenizer_from)


if __name__ == "__main__":
    main()
