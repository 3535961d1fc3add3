"""Next-token selection with the transformers 4.38.2 order of logits processors (spec §8.3).

repetition penalty (over every id seen so far, prompt included: negative logits x p, positive / p)
-> temperature -> top-k -> top-p (drop tokens whose ascending cumulative probability <= 1 - top_p,
keep at least one) -> softmax -> sample. Temperature 0 is greedy (argmax; ties -> lowest id, as
``torch.argmax`` and transformers do). Sampling avoids host syncs: ``argmax(p / Exp(1))`` draws from
``p`` (the exponential-race trick) with a per-request ``torch.Generator`` for reproducible seeds.
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

import torch

from ..errors import InputError


_KINDS = {"temperature": numbers.Real, "top_p": numbers.Real, "top_k": numbers.Integral,
          "repetition_penalty": numbers.Real, "seed": numbers.Integral}


@dataclass(frozen=True)
class SamplingParams:
    """The sampling settings: their one definition and their one validation (every front end builds this)."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int | None = None  # None = a fresh random seed per request

    def __post_init__(self) -> None:
        problem = SamplingParams.problem(vars(self))
        if problem is not None:
            raise InputError(problem[1])

    @staticmethod
    def problem(values: Mapping[str, Any]) -> tuple[str, str] | None:
        """The first bad setting of ``values`` (absent ones: the defaults) as (field name, message naming
        the value), or None. The server uses it to name the API error's ``param``."""
        v = {f.name: f.default for f in fields(SamplingParams)} | dict(values)
        for name, kind in _KINDS.items():
            value = v[name]
            if not (value is None and name == "seed") and (isinstance(value, bool) or not isinstance(value, kind)):
                return name, (f"{name} must be {'an integer' if kind is numbers.Integral else 'a number'}"
                              f"{' or None' if name == 'seed' else ''}, got {value!r}")
        if v["temperature"] < 0:
            return "temperature", f"temperature must be >= 0, got {v['temperature']}"
        if not 0 < v["top_p"] <= 1:
            return "top_p", f"top_p must be in (0, 1], got {v['top_p']}"
        if v["top_k"] < 0:
            return "top_k", f"top_k must be >= 0, got {v['top_k']}"
        if v["repetition_penalty"] <= 0:
            return "repetition_penalty", f"repetition_penalty must be > 0, got {v['repetition_penalty']}"
        if v["seed"] is not None and not -(2**63) <= v["seed"] < 2**63:
            return "seed", f"seed must fit in a signed 64-bit integer, got {v['seed']}"
        return None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """logits (B, V) fp32, seen (B, V) bool: transformers' RepetitionPenaltyLogitsProcessor."""
    if penalty == 1.0:
        return logits
    penalised = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(seen, penalised, logits)


def filter_top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    if top_k > 0:
        k = min(top_k, logits.shape[-1])
        kth = torch.topk(logits, k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, sorted_idx = torch.sort(logits, descending=False, dim=-1)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        remove = cum <= (1 - top_p)
        remove[..., -1:] = False  # keep at least the most likely token
        logits = logits.masked_fill(remove.scatter(-1, sorted_idx, remove), float("-inf"))
    return logits


def sample(logits: torch.Tensor, params: SamplingParams, seen: torch.Tensor | None = None,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """logits (B, V) -> token ids (B,)."""
    logits = logits.float()
    if seen is not None:
        logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
    if params.greedy:
        return logits.argmax(dim=-1)
    logits = filter_top_k_top_p(logits / params.temperature, params.top_k, params.top_p)
    probs = logits.softmax(dim=-1)
    noise = torch.empty_like(probs).exponential_(1.0, generator=generator)
    return (probs / noise).argmax(dim=-1)
