"""No-repeat n-gram rule of the DeepSeek-OCR scripts: an end to repetition loops on documents.

Reproduces ``NoRepeatNGramLogitsProcessor`` of the official ``process/ngram_norepeat.py``. Over the
tokens *generated so far* (vLLM hands its logits processors the output ids, not the prompt): once
there are at least ``ngram_size`` of them, every n-gram that starts within the last ``window_size``
tokens and whose first n-1 tokens equal the last n-1 generated tokens bans its final token, unless
that token is whitelisted (the official scripts whitelist ``<td>`` and ``</td>``: tables legitimately
repeat cells). The official OCR scripts use n = 20 with windows of 50 (PDF) or 90 (images), and
n = 40, window 90 for the benchmark run.

Host-side per row (the banned set depends on the exact history). :class:`NoRepeatProcessor` is the
rule as a logits processor of the generation hook (``generation.constraints.LogitsProcessor``); the
pipeline adds one when ``GenerateArgs.no_repeat_ngram`` is set.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from ..errors import InputError


@dataclass(frozen=True)
class NoRepeatNGram:
    ngram_size: int
    window_size: int = 90
    whitelist: frozenset[int] = frozenset()

    def __post_init__(self) -> None:
        if self.ngram_size < 1:
            raise InputError(f"no_repeat_ngram must be >= 1, got {self.ngram_size}")
        if self.window_size < 1:
            raise InputError(f"no_repeat_window must be >= 1, got {self.window_size}")

    def banned(self, history: Sequence[int]) -> set[int]:
        """Tokens that would complete an n-gram already generated within the window."""
        n, length = self.ngram_size, len(history)
        if length < n:
            return set()
        prefix = tuple(history[length - n + 1:])
        found = {history[i + n - 1] for i in range(max(0, length - self.window_size), length - n + 1)
                 if tuple(history[i:i + n - 1]) == prefix}
        return found - self.whitelist

    def apply(self, logits: torch.Tensor, histories: Iterable[Sequence[int]]) -> torch.Tensor:
        """logits (B, V) -> a copy with every row's banned tokens at -inf (the input when none is banned)."""
        rows = [(r, sorted(self.banned(h))) for r, h in enumerate(histories)]
        rows = [(r, ids) for r, ids in rows if ids]
        if not rows:
            return logits
        logits = logits.clone()
        for r, ids in rows:
            logits[r, torch.tensor(ids, device=logits.device)] = float("-inf")
        return logits


class NoRepeatProcessor:
    """The rule over each row's generated ids, as a ``LogitsProcessor`` of ``generate``."""

    def __init__(self, rule: NoRepeatNGram, batch_size: int):
        self.rule = rule
        self.history: list[list[int]] = [[] for _ in range(batch_size)]

    def __call__(self, logits: torch.Tensor, remaining: int) -> torch.Tensor:
        return self.rule.apply(logits, self.history)

    def advance(self, tokens: torch.Tensor) -> None:
        for row, t in zip(self.history, tokens.tolist()):
            row.append(t)
