"""Constrained decoding: logits processors, and the box-list automaton for ``<|det|>`` spans.

A *logits processor* is an object the generation loop calls on the logits of every step before
sampling (``processor(logits, remaining) -> logits``) and tells the token that was chosen
(``processor.advance(tokens)``). ``generate(..., processors=[...])`` applies them in order; they
keep their state on the model's device, so a step never waits for the host.

:class:`BoxConstraint` keeps every ``<|det|> ... <|/det|>`` span a prefix of

    [[x1, y1, x2, y2](, [x1, y1, x2, y2])*]      (x, y: 1-3 digits, i.e. integers 0-999)

with at most one space after each comma, followed by ``<|/det|>`` (spec 9.1: the spelling of the
official answers, ``[[582, 271, 942, 888]]``). Outside a det span it changes nothing. It also
counts the tokens left: a box list is opened only if it can be closed before ``max_new_tokens``,
and once open it is steered to close in time, so a constrained answer never ends inside a span.

How: a character automaton of 23 states (plus "outside" and "dead") is run over the text of every
token of the vocabulary once per tokenizer (:func:`box_automaton`, cached), giving a table
``next_state[state, token]``. A breadth-first pass gives each state's fewest tokens to get back
outside; ``cost[state, token]`` = that number for the state the token leads to. A step is then one
row gather and a compare: ``allowed = cost[state] <= remaining - 1``. Sampling, top-k/top-p and
repetition penalty all run after the mask, on the allowed tokens only. When the model's greedy
answer already fits the grammar, every greedy choice was allowed, so the answer is unchanged.

Why not xgrammar / outlines (both on PyPI): this grammar is regular and tiny; a hand-written
automaton is ~150 lines, has no compiled dependency or tokenizer adapter to keep in step with
``tokenizers``, and costs one gather per step (measured in ``bench/box_constraint.py``).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch

from ..errors import TokenizerError
from ..processing.tokenizer import Tokenizer


class LogitsProcessor(Protocol):
    """The hook of ``generate``: change the (B, V) fp32 logits before sampling, then see the tokens."""

    def __call__(self, logits: torch.Tensor, remaining: int) -> torch.Tensor:
        """``remaining``: tokens left to generate, this one included (>= 1)."""

    def advance(self, tokens: torch.Tensor) -> None:
        """``tokens`` (B,): the ids chosen at this step (EOS for rows that had already finished)."""


def apply_processors(processors: Sequence[LogitsProcessor], logits: torch.Tensor, remaining: int) -> torch.Tensor:
    for p in processors:
        logits = p(logits, remaining)
    return logits


# ---- the character automaton of a box list -----------------------------------------------------------
OUTSIDE, START, LIST = 0, 1, 2  # outside any det span; just after <|det|>; expecting "[" of a box
# NUM[k][d]: in coordinate k (0-3) with d digits read (d = 0: a digit must come)
NUM = [[3 + 4 * k + d for d in range(4)] for k in range(4)]
SEP = {k: 19 + k - 1 for k in (1, 2, 3)}  # after the comma before coordinate k: optional space
BOX_END, LIST_SEP, CLOSED = 22, 23, 24  # after "]" of a box; after "," between boxes; after the final "]"
DEAD = 25
N_STATES = 26
UNREACHABLE = 30000  # cost of a dead end (fits int16)


def step_char(state: int, ch: str) -> int:
    """One character of a det span's text; DEAD where the grammar does not allow it."""
    if state == START:
        return LIST if ch == "[" else DEAD
    if state == LIST:
        return NUM[0][0] if ch == "[" else DEAD
    if state == BOX_END:
        return {",": LIST_SEP, "]": CLOSED}.get(ch, DEAD)
    if state == LIST_SEP:
        return {" ": LIST, "[": NUM[0][0]}.get(ch, DEAD)
    for k, s in SEP.items():
        if state == s:
            return NUM[k][0] if ch == " " else NUM[k][1] if ch.isdigit() and ch.isascii() else DEAD
    for k in range(4):
        for d in range(4):
            if state != NUM[k][d]:
                continue
            if ch.isascii() and ch.isdigit():
                return NUM[k][d + 1] if d < 3 else DEAD
            if d == 0:
                return DEAD
            if ch == "," and k < 3:
                return SEP[k + 1]
            if ch == "]" and k == 3:
                return BOX_END
            return DEAD
    return DEAD  # OUTSIDE, CLOSED and DEAD take no characters


def step_text(state: int, text: str) -> int:
    if not text:
        return DEAD  # a token that writes nothing would let a span run forever
    for ch in text:
        state = step_char(state, ch)
        if state == DEAD:
            return DEAD
    return state


@dataclass(eq=False)  # hashed by identity: cached per tokenizer, and caches built on it
class BoxAutomaton:
    """Token-level tables of the box grammar for one tokenizer and vocabulary width."""

    next_state: torch.Tensor  # (N_STATES, V) int64: state after the token
    cost: torch.Tensor  # (N_STATES, V) int16: fewest tokens from that next state back outside
    det_id: int
    det_end_id: int
    candidates: dict[int, str] = field(default_factory=dict, repr=False)  # id -> text of the grammar's tokens
    _devices: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict, repr=False)

    def on(self, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(next_state, cost)`` on ``device`` (copied once per device)."""
        key = str(device)
        if key not in self._devices:
            self._devices[key] = (self.next_state.to(device), self.cost.to(device))
        return self._devices[key]

    def accepts(self, ids: Sequence[int]) -> bool:
        """Whether a finished id sequence is outside every det span and never broke the grammar."""
        state = OUTSIDE
        for i in ids:
            state = int(self.next_state[state, i])
            if state == DEAD:
                return False
        return state == OUTSIDE


def distances_to_outside(nxt: np.ndarray) -> np.ndarray:
    """Fewest tokens from each state back outside a span (Bellman-Ford over unit-cost token edges)."""
    dist = np.full(N_STATES, UNREACHABLE, dtype=np.int64)
    dist[OUTSIDE] = 0
    for _ in range(N_STATES):
        best = np.minimum(dist, 1 + dist[nxt].min(axis=1))
        best[OUTSIDE], best[DEAD] = 0, UNREACHABLE
        if np.array_equal(best, dist):
            break
        dist = np.minimum(best, UNREACHABLE)
    return dist


def build_box_automaton(token_texts: Sequence[str], vocab_size: int, det_id: int, det_end_id: int) -> BoxAutomaton:
    """Tables for a vocabulary whose token ``i`` writes ``token_texts[i]`` (ids past the list: nothing)."""
    nxt = np.full((N_STATES, vocab_size), DEAD, dtype=np.int64)
    nxt[OUTSIDE] = OUTSIDE
    nxt[OUTSIDE, det_id] = START
    nxt[CLOSED, det_end_id] = OUTSIDE
    grammar = set("[], 0123456789")
    candidates = {}
    for i, text in enumerate(token_texts[:vocab_size]):
        if i in (det_id, det_end_id) or not text or not set(text) <= grammar:
            continue
        candidates[i] = text
        for s in range(START, CLOSED):
            nxt[s, i] = step_text(s, text)
    dist = distances_to_outside(nxt)
    if dist[START] >= UNREACHABLE:
        raise TokenizerError("the tokenizer cannot write a box list [[x1, y1, x2, y2]] followed by <|/det|> "
                             "(no tokens for '[', digits, ',' or ']'): box-constrained decoding is impossible")
    cost = np.minimum(dist[nxt], UNREACHABLE).astype(np.int16)
    return BoxAutomaton(torch.from_numpy(nxt), torch.from_numpy(cost), det_id, det_end_id, candidates)


@functools.lru_cache(maxsize=8)
def box_automaton(tokenizer: Tokenizer, vocab_size: int) -> BoxAutomaton:
    """The automaton of a :class:`dsvl2.processing.tokenizer.Tokenizer` for a model whose logits have
    ``vocab_size`` entries (the model's vocabulary may have rows the tokenizer never writes).

    Built once per (tokenizer, width) and cached: about a second for a 129k vocabulary.
    """
    return build_box_automaton(tokenizer.token_texts(), vocab_size, tokenizer.det_id, tokenizer.det_end_id)


class BoxConstraint:
    """The logits processor of the box grammar for one generation of ``batch_size`` rows."""

    def __init__(self, automaton: BoxAutomaton, batch_size: int, device: torch.device | str) -> None:
        self.next_state, self.cost = automaton.on(device)
        self.state = torch.zeros(batch_size, dtype=torch.long, device=device)  # every row starts outside

    def __call__(self, logits: torch.Tensor, remaining: int) -> torch.Tensor:
        allowed = self.cost.index_select(0, self.state) <= remaining - 1  # (B, V)
        return logits.masked_fill(~allowed, float("-inf"))

    def advance(self, tokens: torch.Tensor) -> None:
        self.state = self.next_state[self.state, tokens]
