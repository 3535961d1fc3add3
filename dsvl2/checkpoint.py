"""Official checkpoint <-> dsvl2 model: key table, strict loading, saving in the same layout.

Checkpoints are the official Hugging Face layout: ``config.json``, ``model.safetensors`` or shards
with ``model.safetensors.index.json``. Our parameter names equal the official keys except for two
documented differences, both handled only here:

- ``view_seperator`` (sic) is ``view_separator`` in the model;
- routed experts are stacked: ``...mlp.experts.{gate,up,down}_proj`` of shape (E, out, in) hold the
  official ``...mlp.experts.{j}.{gate,up,down}_proj.weight``.

``vision.attn_pool.*`` (the SigLIP pooling head that DeepSeek-VL2 never runs) is read, kept aside,
and written back on save, so a round trip is bit-exact.

Loading builds the model on the ``meta`` device and reads every tensor straight into its final
buffer (expert slices directly into the stacked tensor) with ``readinto``, so the peak resident
memory is about one copy of the weights: no random init, no mmap'd file held in RSS, no second copy.
The safetensors format (8-byte header length, JSON header, raw little-endian data) is read and
written here directly for that reason; files stay readable by the ``safetensors`` library (tested).
"""

from __future__ import annotations

import json
import os
import re
import struct
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from .errors import CheckpointError, InputError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
IGNORED_PREFIXES = ("vision.attn_pool.",)

_DTYPES = {
    "BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
_NAMES = {v: k for k, v in _DTYPES.items()}
_EXPERT = re.compile(r"^(.*\.mlp\.experts)\.(gate_proj|up_proj|down_proj)$")


# DeepSeek-OCR 2 (``DeepseekOCR2ForCausalLM``): everything sits under ``model.`` except ``lm_head``, the
# language model's keys have no ``language.`` level, and the query encoder keeps the official nesting
# of a Qwen2 model inside a wrapper (``qwen2_model.model.model.layers``). First matching prefix wins.
OCR2_PREFIXES = (
    ("language.model.", "model."),
    ("language.lm_head.", "lm_head."),
    ("qwen2_model.layers.", "model.qwen2_model.model.model.layers."),
    ("qwen2_model.norm.", "model.qwen2_model.model.model.norm."),
    ("qwen2_model.", "model.qwen2_model."),
    ("sam_model.", "model.sam_model."),
    ("projector.", "model.projector."),
    ("view_separator", "model.view_seperator"),
)


def official_keys(name: str, shape: torch.Size, prefixes: tuple[tuple[str, str], ...] = ()) -> list[str]:
    """Official key(s) holding our parameter ``name`` (one per expert for stacked experts).

    ``prefixes``: (ours, official) renames of the model family (``OCR2_PREFIXES``; none for VL2).
    """
    for ours, theirs in prefixes:
        if name.startswith(ours):
            name = theirs + name[len(ours):]
            break
    else:
        if name == "view_separator":
            return ["view_seperator"]
    m = _EXPERT.match(name)
    if m:
        return [f"{m.group(1)}.{j}.{m.group(2)}.weight" for j in range(shape[0])]
    return [name]


def build_empty(cfg):
    """The model of ``cfg`` (DeepSeek-VL2 or DeepSeek-OCR 2) and its key renames; call under ``meta``."""
    from .config_ocr2 import OCR2Config

    if isinstance(cfg, OCR2Config):
        from .model.ocr2 import DeepseekOCR2

        return DeepseekOCR2(cfg), OCR2_PREFIXES
    from .model.vlm import DSVL2

    return DSVL2(cfg), ()


def key_prefixes(model) -> tuple[tuple[str, str], ...]:
    from .model.ocr2 import DeepseekOCR2

    return OCR2_PREFIXES if isinstance(model, DeepseekOCR2) else ()


# ---- safetensors reading/writing ------------------------------------------------------------------
class SafetensorsFile:
    """One .safetensors file: its header, and tensors read into caller-provided buffers."""

    def __init__(self, path: Path):
        self.path = path
        try:
            with open(path, "rb") as f:
                raw = f.read(8)
                if len(raw) != 8:
                    raise CheckpointError(f"{path}: truncated safetensors file (no header)")
                (n,) = struct.unpack("<Q", raw)
                if n > 100_000_000:
                    raise CheckpointError(f"{path}: header length {n} is implausible; not a safetensors file")
                header = json.loads(f.read(n))
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path}: cannot read safetensors header ({e})") from None
        self.data_start = 8 + n
        self.meta = header.pop("__metadata__", None) or {}
        self.entries = header
        size = path.stat().st_size
        for key, e in header.items():
            if e.get("dtype") not in _DTYPES:
                raise CheckpointError(f"{path}: tensor {key!r} has unsupported dtype {e.get('dtype')!r}")
            if self.data_start + e["data_offsets"][1] > size:
                raise CheckpointError(f"{path}: tensor {key!r} lies past the end of the file (truncated?)")

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.entries[key]["shape"])

    def dtype(self, key: str) -> torch.dtype:
        return _DTYPES[self.entries[key]["dtype"]]

    def read_into(self, key: str, out: torch.Tensor, f) -> None:
        """Read tensor ``key`` into ``out`` (same shape, any dtype; contiguous)."""
        e = self.entries[key]
        start, end = e["data_offsets"]
        dtype = _DTYPES[e["dtype"]]
        if out.dtype == dtype and out.is_contiguous() and out.device.type == "cpu":
            target = out
        else:
            target = torch.empty(out.shape, dtype=dtype)
        buf = target.view(-1).view(torch.uint8) if target.numel() else torch.empty(0, dtype=torch.uint8)
        if buf.numel() != end - start:
            raise CheckpointError(f"{self.path}: tensor {key!r} has {end - start} bytes, expected {buf.numel()}")
        f.seek(self.data_start + start)
        if f.readinto(memoryview(buf.numpy())) != end - start:
            raise CheckpointError(f"{self.path}: tensor {key!r} is truncated")
        if target is not out:
            out.copy_(target)


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Write ``tensors`` (views allowed, no copies of the whole set) to ``path`` atomically."""
    header: dict = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for key, t in tensors.items():
        n = t.numel() * t.element_size()
        header[key] = {"dtype": _NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * ((8 - len(raw) % 8) % 8)  # align the data section, as the library does
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for t in tensors.values():
            t = t.detach().to("cpu").contiguous()
            if t.numel():
                f.write(memoryview(t.view(-1).view(torch.uint8).numpy()))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _weight_files(directory: Path) -> list[Path]:
    index = directory / INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from None
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not (directory / f).is_file()]
        if missing:
            raise CheckpointError(f"{index} lists shard(s) that do not exist: {missing}")
        return [directory / f for f in files]
    if (directory / SINGLE_NAME).is_file():
        return [directory / SINGLE_NAME]
    found = sorted(directory.glob("*.safetensors"))
    if found:
        return found
    raise CheckpointError(f"{directory}: no {SINGLE_NAME}, {INDEX_NAME} or *.safetensors found")


# ---- loading ----------------------------------------------------------------------------------------
def check_device(device: str | torch.device) -> None:
    """Raise :class:`InputError` naming ``device`` unless tensors can be made on it here."""
    try:
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError, TypeError) as exc:  # unknown name; CUDA missing (torch asserts)
        raise InputError(f"device {str(device)!r} is not usable here: {exc}") from exc


def load_model(directory: str | Path, dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cpu",
               progress: Callable[[int, int], None] | None = None, quantize: str | None = None):
    """Build the model of ``directory/config.json`` and fill it from the safetensors files, strictly.

    Every parameter must be present with the right shape; unknown keys are errors (``attn_pool`` is
    the one documented exception). ``progress(done_bytes, total_bytes)`` is called while reading.
    ``quantize="int8"|"int4"``: the language model's linear and expert weights are quantized as each
    tensor is read (``model/quant.py``), so the peak memory is the quantized model plus one tensor.
    """
    from .config_ocr2 import read_config
    from .model import quant

    quant.check_mode(quantize)
    check_device(device)

    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"model directory not found: {directory}")
    cfg = read_config(directory / "config.json")
    with torch.device("meta"):
        model, prefixes = build_empty(cfg)
    params = dict(model.named_parameters())
    int8 = quant.int8_targets(model) if quantize else {}

    files = [SafetensorsFile(p) for p in _weight_files(directory)]
    where: dict[str, SafetensorsFile] = {}
    for sf in files:
        for key in sf.entries:
            if key in where:
                raise CheckpointError(f"key {key!r} appears in both {where[key].path.name} and {sf.path.name}")
            where[key] = sf

    wanted: dict[str, list[str]] = {name: official_keys(name, p.shape, prefixes) for name, p in params.items()}
    expected = {k for keys in wanted.values() for k in keys}
    missing = sorted(expected - where.keys())
    if missing:
        raise CheckpointError(f"{directory}: {len(missing)} missing weight(s), e.g. {missing[:5]}")
    unexpected = sorted(k for k in where if k not in expected and not k.startswith(IGNORED_PREFIXES))
    if unexpected:
        raise CheckpointError(f"{directory}: {len(unexpected)} unexpected weight(s), e.g. {unexpected[:5]}")

    total = sum(sf.data_start and (e["data_offsets"][1] - e["data_offsets"][0])
                for sf in files for e in sf.entries.values())
    done = 0
    handles = {sf.path: open(sf.path, "rb") for sf in files}
    try:
        state: dict[str, torch.Tensor] = {}
        for name, p in params.items():
            keys = wanted[name]
            # Router correction bias: the reference holds it as a parameter of the checkpoint dtype.
            target = torch.empty(p.shape, dtype=dtype)
            per_key = target.unbind(0) if len(keys) > 1 or _EXPERT.match(name) else [target]
            for key, out in zip(keys, per_key):
                sf = where[key]
                if sf.shape(key) != tuple(out.shape):
                    raise CheckpointError(
                        f"{sf.path.name}: {key!r} has shape {list(sf.shape(key))}, the config "
                        f"({directory / 'config.json'}) needs {list(out.shape)}"
                    )
                sf.read_into(key, out, handles[sf.path])
                done += out.numel() * sf.dtype(key).itemsize
                if progress:
                    progress(done, total)
            if name in int8:
                for qname, value in zip(quant.quantized_names(name, quantize), quant.QUANTIZERS[quantize](target)):
                    state[qname] = value.to(device)
                del target
            else:
                state[name] = target.to(device) if torch.device(device).type != "cpu" else target
        unused = {}
        for key, sf in where.items():
            if key.startswith(IGNORED_PREFIXES):
                t = torch.empty(sf.shape(key), dtype=sf.dtype(key))
                sf.read_into(key, t, handles[sf.path])
                unused[key] = t
    finally:
        for f in handles.values():
            f.close()
    if int8:
        quant.swap_int8_modules_(model, dtype, quantize)
    model.load_state_dict(state, strict=True, assign=True)
    # The non-persistent RoPE buffers are not in the state dict: rebuild them in fp32 on the target device.
    if prefixes:
        model.reset_buffers_(device)
    else:
        model.language.model.rotary.reset_(device)
    model.unused_checkpoint_tensors = unused
    model.eval()
    return model


def save_model(model, directory: str | Path, max_shard_bytes: int = 5 * 1024 ** 3) -> None:
    """Write ``config.json`` + safetensors shards + index in the official layout (bit-exact round trip)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.cfg.save(directory)
    tensors = dict(iter_official_tensors(model))
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, t in tensors.items():
        n = t.numel() * t.element_size()
        if shards[-1] and size + n > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = t
        size += n
    weight_map = {}
    total = 0
    for i, shard in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):06d}.safetensors"
        write_safetensors(directory / name, shard)
        for key, t in shard.items():
            weight_map[key] = name
            total += t.numel() * t.element_size()
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    tmp = directory / (INDEX_NAME + ".tmp")
    tmp.write_text(json.dumps(index, indent=2) + "\n")
    os.replace(tmp, directory / INDEX_NAME)


def iter_official_tensors(model) -> Iterator[tuple[str, torch.Tensor]]:
    """(official key, tensor view) for every weight, experts unstacked, attn_pool included if kept."""
    prefixes = key_prefixes(model)
    for name, p in model.state_dict().items():
        keys = official_keys(name, p.shape, prefixes)
        if len(keys) > 1 or _EXPERT.match(name):
            yield from zip(keys, p.detach().unbind(0))
        else:
            yield keys[0], p.detach()
    yield from getattr(model, "unused_checkpoint_tensors", {}).items()
