"""LoRA fine-tuning: low-rank adapters on selectable linears, saved in PEFT's format, mergeable.

An adapter is a ``torch.nn.utils.parametrize`` parametrization of a weight: ``W + (B @ A) * alpha / r``
with ``A`` Kaiming-uniform and ``B`` zero (PEFT's default init, so training starts from the base
model). Because the model code reads ``.weight`` (and the stacked expert tensors) as usual, every path
(naive and absorbed MLA, the grouped expert matmuls) sees the adapted weight with no change to the
model. Target groups:

- ``attention``: every linear of the language model's attention (``q_proj``, ``kv_a_proj_with_mqa``,
  ``kv_b_proj``, ``o_proj``; MHA ``q/k/v/o_proj``);
- ``experts``: routed experts (one adapter per expert, stored stacked ``(E, r, in)``) and shared
  experts (``gate_proj``, ``up_proj``, ``down_proj``);
- ``projector``: the two projector linears;
- ``vision``: the ViT's ``qkv`` and ``proj``.

Saved files follow PEFT (``save_pretrained`` of a ``LoraConfig`` model): ``adapter_config.json`` and
``adapter_model.safetensors`` with keys ``base_model.model.<official module path>.lora_A.weight`` (r, in)
and ``...lora_B.weight`` (out, r). Routed experts are unstacked into the official per-expert modules
(``...mlp.experts.<j>.gate_proj``), so PEFT over the official model (and vLLM's LoRA loader, which
reads the same names) finds every adapter. ``target_modules`` is written as a regular expression that
PEFT full-matches against module names.

:func:`merge_lora` folds the adapters into the weights (``remove_parametrizations(leave_parametrized)``)
and leaves a plain model that :func:`dsvl2.checkpoint.save_model` writes in the official layout.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils import parametrize

from dsvl2.errors import CheckpointError, ConfigError
from dsvl2.model.moe import Experts

GROUPS = ("attention", "experts", "projector", "vision")
PREFIX = "base_model.model."
_REGEX = {
    "attention": r"language\.model\.layers\.\d+\.self_attn\.(q_proj|kv_a_proj_with_mqa|kv_b_proj|o_proj|k_proj|v_proj)",
    "experts": r"language\.model\.layers\.\d+\.mlp\.(experts\.\d+|shared_experts)\.(gate_proj|up_proj|down_proj)",
    "projector": r"projector\.layers\.\d+",
    "vision": r"vision\.blocks\.\d+\.attn\.(qkv|proj)",
}


class LoRADelta(nn.Module):
    """Parametrization ``W -> W + B @ A * scale`` for a (out, in) or stacked (E, out, in) weight."""

    def __init__(self, shape: torch.Size, r: int, alpha: float, generator: torch.Generator | None = None) -> None:
        super().__init__()
        *lead, out_f, in_f = shape
        self.scale = alpha / r
        a = torch.empty(*lead, r, in_f)
        bound = 1 / math.sqrt(in_f)  # kaiming_uniform_(a=sqrt(5)), PEFT's init of lora_A
        a.uniform_(-bound, bound, generator=generator)
        self.lora_A = nn.Parameter(a)
        self.lora_B = nn.Parameter(torch.zeros(*lead, out_f, r))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        delta = torch.matmul(self.lora_B, self.lora_A) * self.scale  # (…, out, in)
        return weight + delta.to(weight.dtype)


def targets(model: nn.Module, groups: Sequence[str]) -> list[tuple[str, nn.Module, str]]:
    """(module path, module, parameter name) of every weight the groups adapt, in model order."""
    unknown = sorted(set(groups) - set(GROUPS))
    if unknown or not groups:
        raise ConfigError(f"LoRA targets {unknown or list(groups)}: choose from {list(GROUPS)}")
    pattern = re.compile("|".join(f"(?:{_REGEX[g]})" for g in groups))
    found = []
    for path, module in model.named_modules():
        if isinstance(module, Experts) and "experts" in groups:
            found += [(path, module, name) for name in ("gate_proj", "up_proj", "down_proj")]
        elif isinstance(module, nn.Linear) and pattern.fullmatch(path):
            found.append((path, module, "weight"))
    return found


def apply_lora(model: nn.Module, groups: Sequence[str] = ("attention", "experts", "projector"), r: int = 8,
               alpha: float = 16.0, seed: int = 0) -> dict:
    """Add adapters to the chosen groups; returns (and stores as ``model.lora_config``) the PEFT config."""
    if r <= 0:
        raise ConfigError(f"LoRA rank must be positive, got {r}")
    gen = torch.Generator().manual_seed(seed)
    for _path, module, name in targets(model, groups):
        weight = getattr(module, name)
        parametrize.register_parametrization(module, name, LoRADelta(weight.shape, r, alpha, gen).to(weight.device))
    config = {
        "peft_type": "LORA", "task_type": None, "r": r, "lora_alpha": alpha, "lora_dropout": 0.0,
        "bias": "none", "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True,
        "target_modules": "|".join(f"(?:{_REGEX[g]})" for g in groups), "modules_to_save": None,
        "use_rslora": False, "use_dora": False, "base_model_name_or_path": None, "revision": None,
        "layers_to_transform": None, "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {},
        "dsvl2_groups": list(groups),
    }
    model.lora_config = config
    return config


def has_lora(model: nn.Module) -> bool:
    return any(isinstance(m, LoRADelta) for m in model.modules())


def _adapters(model: nn.Module) -> list[tuple[str, nn.Module, str, LoRADelta]]:
    out = []
    for path, module in model.named_modules():
        if parametrize.is_parametrized(module):
            for name, plist in module.parametrizations.items():
                for p in plist:
                    if isinstance(p, LoRADelta):
                        out.append((path, module, name, p))
    return out


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """PEFT-named adapter tensors; stacked experts become one pair per official expert module."""
    state = {}
    for path, module, name, delta in _adapters(model):
        if isinstance(module, Experts):
            for j in range(delta.lora_A.shape[0]):
                key = f"{PREFIX}{path}.{j}.{name}"
                state[f"{key}.lora_A.weight"] = delta.lora_A[j].detach().contiguous()
                state[f"{key}.lora_B.weight"] = delta.lora_B[j].detach().contiguous()
        else:
            state[f"{PREFIX}{path}.lora_A.weight"] = delta.lora_A.detach().contiguous()
            state[f"{PREFIX}{path}.lora_B.weight"] = delta.lora_B.detach().contiguous()
    return state


def save_adapter(model: nn.Module, directory: str | Path) -> None:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` (PEFT ``save_pretrained`` layout)."""
    from safetensors.torch import save_file

    if not has_lora(model):
        raise ConfigError("the model has no LoRA adapters to save")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(adapter_state(model), str(directory / "adapter_model.safetensors"), metadata={"format": "pt"})
    (directory / "adapter_config.json").write_text(json.dumps(model.lora_config, indent=2) + "\n")


def load_adapter_weights(model: nn.Module, directory: str | Path) -> None:
    """Copy saved adapter tensors into a model that already has the same adapters (strict)."""
    from safetensors.torch import load_file

    path = Path(directory) / "adapter_model.safetensors"
    if not path.is_file():
        raise CheckpointError(f"adapter weights not found: {path}")
    saved = load_file(str(path))
    expected = adapter_state(model)
    missing, unexpected = sorted(expected.keys() - saved.keys()), sorted(saved.keys() - expected.keys())
    if missing or unexpected:
        raise CheckpointError(f"{path}: missing {missing[:3]}, unexpected {unexpected[:3]} adapter key(s)")
    with torch.no_grad():
        for path_, module, name, delta in _adapters(model):
            if isinstance(module, Experts):
                for j in range(delta.lora_A.shape[0]):
                    key = f"{PREFIX}{path_}.{j}.{name}"
                    delta.lora_A[j].copy_(saved[f"{key}.lora_A.weight"])
                    delta.lora_B[j].copy_(saved[f"{key}.lora_B.weight"])
            else:
                for part in ("lora_A", "lora_B"):
                    src = saved[f"{PREFIX}{path_}.{part}.weight"]
                    dst = getattr(delta, part)
                    if src.shape != dst.shape:
                        raise CheckpointError(f"{path}: {PREFIX}{path_}.{part}.weight has shape "
                                              f"{list(src.shape)}, the model needs {list(dst.shape)}")
                    dst.copy_(src)


def load_adapter(model: nn.Module, directory: str | Path) -> dict:
    """Add the adapters described by ``adapter_config.json`` and load their weights."""
    path = Path(directory) / "adapter_config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"cannot read {path}: {err}") from err
    if config.get("peft_type") != "LORA":
        raise CheckpointError(f"{path}: peft_type {config.get('peft_type')!r} is not LORA")
    groups = config.get("dsvl2_groups") or [g for g in GROUPS if f"(?:{_REGEX[g]})" in config["target_modules"]]
    apply_lora(model, groups, int(config["r"]), float(config["lora_alpha"]))
    load_adapter_weights(model, directory)
    return config


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its weight; the model is plain again (and saves in the official layout)."""
    for _path, module, name, _delta in _adapters(model):
        if parametrize.is_parametrized(module, name):
            parametrize.remove_parametrizations(module, name, leave_parametrized=True)
    if hasattr(model, "lora_config"):
        del model.lora_config
    return model
