"""The three DeepSeek-VL2 training stages as data (paper §4.2, Table 2), plus how a stage applies.

1. **align** (vision-language alignment): the vision encoder, the projector and the two learned
   separators train, the language model is frozen.
2. **pretrain** (vision-language pretraining): every parameter trains, on interleaved image-text and
   pure text.
3. **sft** (supervised fine-tuning): every parameter trains, the loss is on the answers only
   (``mask_prompt``).

A :class:`StageConfig` says which modules train, the learning rates (the vision encoder gets
``vision_lr_mult`` times the base rate), AdamW betas and weight decay, clipping, warmup and the
schedule (cosine / step / constant), the data mixture (source name -> weight), the packed sequence
length, the MoE balance settings and the speed options. The stages differ only in these values; one
loop (:mod:`dsvl2.training.loop`) runs them all. A recipe is a TOML file with a ``[stageN]`` table per
stage (``recipes/*.toml``); CLI flags override single fields.

MoE balance: ``aux_loss_alpha`` (None keeps the checkpoint config's) weights the official
sequence-level balance loss (spec §7.6). For ``noaux_tc`` routers (Base) the reference cannot train
at all (spec P8); we train the gathered sigmoid weights through autograd and, as DeepSeek-V3 §2.1.2
describes, move each expert's correction bias by ``bias_update_rate`` toward balance after every
step (``MoE.update_bias``). This is new behaviour, not a port.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dsvl2.errors import ConfigError

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pip install "dsvl2[train]"
    import tomli as tomllib

SCHEDULES = ("cosine", "step", "constant")
# module groups a stage can train; "all" means every parameter
MODULE_GROUPS = {
    "vision": ("vision.",),
    "projector": ("projector.", "image_newline", "view_separator"),
    "language": ("language.",),
}
STAGE_NAMES = {1: "align", 2: "pretrain", 3: "sft"}


@dataclass(frozen=True)
class StageConfig:
    """Everything that differs between the training stages. Field names are the TOML keys."""

    stage: int = 3
    train: tuple[str, ...] = ("vision", "projector", "language")  # keys of MODULE_GROUPS
    lr: float = 1e-4
    vision_lr_mult: float = 0.1  # the paper's lower rate for the vision encoder
    projector_lr_mult: float = 1.0  # the VL adaptor (projector, newline / separator embeddings)
    min_lr_ratio: float = 0.1  # cosine floor, as a fraction of lr
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    warmup_steps: int = 0
    schedule: str = "cosine"
    step_milestones: tuple[float, ...] = (0.5, 0.75)  # "step": fractions of the run where lr *= step_gamma
    step_gamma: float = 0.1
    steps: int = 100
    batch_size: int = 8  # samples per optimizer step, over all processes
    seq_len: int = 1024  # packed row length (tokens)
    mixture: dict[str, float] = field(default_factory=lambda: {"sft": 1.0})
    mask_prompt: bool = True  # loss on assistant turns only (stage 3); False trains every text token
    aux_loss_alpha: float | None = None  # None: the model config's value
    bias_update_rate: float = 1e-3  # noaux_tc correction-bias step; ignored by softmax routers
    gradient_checkpointing: bool = False
    bf16: bool = False  # autocast the forward to bfloat16 (weights and optimizer stay fp32)
    expanded_mla: bool = True  # decompressed MLA for training (cheaper than the absorbed form)
    seed: int = 0
    log_every: int = 1
    checkpoint_every: int = 0  # 0: only at the end
    keep_checkpoints: int = 2

    def __post_init__(self) -> None:
        def bad(name: str, why: str) -> ConfigError:
            return ConfigError(f"stage {self.stage}: {name} = {getattr(self, name)!r}: {why}")

        object.__setattr__(self, "train", tuple(self.train))
        object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))
        object.__setattr__(self, "step_milestones", tuple(float(m) for m in self.step_milestones))
        object.__setattr__(self, "mixture", {str(k): float(v) for k, v in dict(self.mixture).items()})
        if self.stage not in STAGE_NAMES:
            raise bad("stage", "expected 1 (align), 2 (pretrain) or 3 (sft)")
        unknown = [g for g in self.train if g not in MODULE_GROUPS]
        if unknown or not self.train:
            raise bad("train", f"choose from {sorted(MODULE_GROUPS)}")
        if self.schedule not in SCHEDULES:
            raise bad("schedule", f"expected one of {SCHEDULES}")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise bad("betas", "two values in [0, 1)")
        if self.lr <= 0 or self.vision_lr_mult < 0 or self.projector_lr_mult < 0 or not 0 <= self.min_lr_ratio <= 1:
            raise bad("lr", "lr > 0, vision_lr_mult >= 0, projector_lr_mult >= 0, min_lr_ratio in [0, 1]")
        if self.steps <= 0 or self.batch_size <= 0 or self.seq_len <= 0:
            raise bad("steps", "steps, batch_size and seq_len must be positive")
        if not 0 <= self.warmup_steps <= self.steps:
            raise bad("warmup_steps", f"must be in 0..steps ({self.steps})")
        if not self.mixture or any(w < 0 for w in self.mixture.values()) or sum(self.mixture.values()) <= 0:
            raise bad("mixture", "a non-empty table of source -> non-negative weight, not all zero")
        if self.grad_clip <= 0:
            raise bad("grad_clip", "must be positive")

    @property
    def name(self) -> str:
        return STAGE_NAMES[self.stage]

    def lr_factor(self, step: int) -> float:
        """Multiplier of the base rate at optimizer step ``step`` (0-based): linear warmup, then the schedule."""
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.schedule == "constant":
            return 1.0
        if self.schedule == "step":
            done = step / self.steps
            return self.step_gamma ** sum(done >= m for m in self.step_milestones)
        span = max(1, self.steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def default_stage(stage: int) -> StageConfig:
    """The paper's stage settings (Table 2) at dsvl2's defaults for batch and length."""
    if stage == 1:
        return StageConfig(stage=1, train=("vision", "projector"), lr=5.4e-4, vision_lr_mult=1.0,
                           warmup_steps=10, schedule="cosine", mixture={"caption": 1.0}, mask_prompt=False)
    if stage == 2:
        return StageConfig(stage=2, lr=4.2e-4, warmup_steps=10, schedule="step",
                           mixture={"interleaved": 0.7, "text": 0.3}, mask_prompt=False)
    if stage == 3:
        return StageConfig(stage=3, lr=1.4e-5, warmup_steps=0, schedule="constant", mixture={"sft": 1.0})
    raise ConfigError(f"stage must be 1, 2 or 3, got {stage}")


def stage_from_dict(stage: int, data: dict[str, Any], where: str = "recipe") -> StageConfig:
    """``default_stage(stage)`` with the given fields replaced; an unknown key is an error naming it."""
    names = {f.name for f in dataclasses.fields(StageConfig)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{where}: unknown stage key(s) {unknown}; known: {sorted(names)}")
    if "stage" in data and data["stage"] != stage:
        raise ConfigError(f"{where}: the table for stage {stage} says stage = {data['stage']}")
    try:
        return dataclasses.replace(default_stage(stage), **data)
    except TypeError as err:
        raise ConfigError(f"{where}: {err}") from err


def load_recipe(path: str | Path) -> dict[str, Any]:
    """Read a recipe TOML: ``[stage1]``/``[stage2]``/``[stage3]`` tables, optional ``[sources]``
    (name -> JSONL path, relative to the recipe) and ``[model]`` (free-form, for the caller)."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as err:
        raise ConfigError(f"cannot read recipe {path}: {err}") from err
    allowed = {"stage1", "stage2", "stage3", "sources", "model"}
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise ConfigError(f"{path}: unknown table(s) {unknown}; a recipe has {sorted(allowed)}")
    sources = {k: str((path.parent / v).resolve()) for k, v in data.get("sources", {}).items()}
    return {"path": path, "sources": sources, "model": data.get("model", {}),
            "stages": {n: stage_from_dict(n, data[f"stage{n}"], f"{path} [stage{n}]")
                       for n in (1, 2, 3) if f"stage{n}" in data}}


def is_trained(name: str, stage: StageConfig) -> bool:
    """Whether the parameter called ``name`` (our naming) trains in ``stage``."""
    return any(name.startswith(prefix) for group in stage.train for prefix in MODULE_GROUPS[group])


def apply_freezing(model: nn.Module, stage: StageConfig) -> list[str]:
    """Set ``requires_grad`` per the stage; returns the names of trainable parameters.

    The ``noaux_tc`` correction bias never takes gradients: it moves only by ``update_bias``.
    LoRA adapters (parameters named ``...lora_A``/``lora_B``), when present, are the only trainable
    parameters regardless of the stage's module list: the base weights stay frozen.
    """
    lora = any(".lora_" in n for n, _ in model.named_parameters())
    trainable = []
    for name, p in model.named_parameters():
        if name.endswith("e_score_correction_bias"):
            train = False
        elif lora:
            train = ".lora_" in name
        else:
            train = is_trained(name, stage)
        p.requires_grad_(train)
        if train:
            trainable.append(name)
    if not trainable:
        raise ConfigError(f"stage {stage.stage}: no parameter trains with train = {list(stage.train)}")
    return trainable


def param_groups(model: nn.Module, stage: StageConfig) -> list[dict[str, Any]]:
    """AdamW groups: (vision | projector | rest) x (decay | no decay); norms, biases and 1-D tensors
    get no decay. Vision and projector parameters take ``lr`` times their stage multiplier."""
    kinds = {"vision": MODULE_GROUPS["vision"], "projector": MODULE_GROUPS["projector"]}
    mults = {"vision": stage.vision_lr_mult, "projector": stage.projector_lr_mult, "main": 1.0}
    groups: dict[tuple[str, bool], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        kind = next((k for k, prefixes in kinds.items() if name.startswith(prefixes)), "main")
        decay = p.dim() >= 2 and "norm" not in name
        groups.setdefault((kind, decay), []).append(p)
    out = []
    for (kind, decay), params in sorted(groups.items()):
        lr = stage.lr * mults[kind]
        out.append({"params": params, "lr": lr, "initial_lr": lr,
                    "weight_decay": stage.weight_decay if decay else 0.0,
                    "name": f"{kind}{'' if decay else '_nodecay'}"})
    return out


def make_optimizer(model: nn.Module, stage: StageConfig) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW (betas from the stage) and the warmup + schedule as a LambdaLR."""
    opt = torch.optim.AdamW(param_groups(model, stage), lr=stage.lr, betas=stage.betas, eps=stage.eps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, stage.lr_factor)
    return opt, sched
