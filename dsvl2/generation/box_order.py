"""Ordered corners for box-constrained decoding: ``x1 <= x2`` and ``y1 <= y2`` in every box.

An add-on to :class:`~dsvl2.generation.constraints.BoxConstraint` (``GenerateArgs(constrain_boxes=True,
ordered_boxes=True)``). A finite automaton cannot compare two numbers of up to 1000 values without
1000-fold more states, so the comparison is done with three small registers per row on the device
instead: the value of the number being written, and the finished ``x1`` and ``y1``.

Per (automaton state, token) a table says which coordinate's digits the token writes and how
(number of digits, their value, whether it ends the number); a token may finish one number and
start the next (``5, 6`` in one token), never touch three. While ``x2`` (``y2``) is written, a token is
allowed only if the number can still end at or above ``x1`` (``y1``): a finished number must be
``>= x1``; an unfinished prefix ``p`` of ``n`` digits can still become at most ``(p + 1) * 10**(3 - n) - 1``.
The budget rule of the base constraint is recomputed for the worst case: the fewest tokens to close a
span when ``x2`` and ``y2`` may only be finished with 3 digits and continued with ``9``s (a number that
can still reach ``x1`` reaches it that way), so a span still closes in time whatever ``x1`` and ``y1``.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from ..errors import TokenizerError
from .constraints import (
    CLOSED,
    DEAD,
    N_STATES,
    NUM,
    OUTSIDE,
    SEP,
    START,
    UNREACHABLE,
    BoxAutomaton,
    BoxConstraint,
    distances_to_outside,
    step_char,
)

FIELDS = ("ka", "na", "va", "enda", "kb", "nb", "vb", "endb")  # slot a: the number in progress; b: a new one


def _coordinate(state: int) -> int | None:
    """The coordinate a state is writing (or about to write after a comma), else None."""
    for k in range(4):
        if state in NUM[k] or state == SEP.get(k):
            return k
    return None


DIGITS_READ = np.zeros(N_STATES, dtype=np.int64)
for _k in range(4):
    for _d in range(4):
        DIGITS_READ[NUM[_k][_d]] = _d

def token_effect(state: int, text: str) -> dict[str, int] | None:
    """The two slots of one (state, token); None when the token touches three numbers."""
    cur = _coordinate(state)
    out = {"ka": -1 if cur is None else cur, "na": 0, "va": 0, "enda": 0, "kb": -1, "nb": 0, "vb": 0, "endb": 0}
    for ch in text:
        k = _coordinate(state)
        if ch.isdigit():
            if k == cur and out["kb"] < 0 and not out["enda"]:
                out["na"], out["va"] = out["na"] + 1, out["va"] * 10 + int(ch)
            elif out["kb"] in (-1, k) and not out["endb"]:
                out["kb"], out["nb"], out["vb"] = k, out["nb"] + 1, out["vb"] * 10 + int(ch)
            else:
                return None
        elif ch in ",]" and state in sum(NUM, []) and DIGITS_READ[state] > 0:
            if k == cur and out["kb"] < 0:
                out["enda"] = 1
            elif k == out["kb"]:
                out["endb"] = 1
        state = step_char(state, ch)
    return out


@functools.lru_cache(maxsize=8)
def ordered_tables(automaton: BoxAutomaton) -> dict[str, torch.Tensor]:
    """Slot tables over the grammar's candidate tokens only (``ids``: (C,)), each (N_STATES, C) int64;
    ``bad``: three-number tokens; ``cost``: (N_STATES, V) tokens to close after the token, at worst."""
    nxt = automaton.next_state.numpy()
    ids = np.array(sorted(automaton.candidates), dtype=np.int64)
    tables = {name: np.zeros((N_STATES, len(ids)), dtype=np.int64) for name in FIELDS}
    tables["ka"][:] = tables["kb"][:] = -1
    bad = np.zeros((N_STATES, len(ids)), dtype=bool)
    for s in range(START, CLOSED):
        for c, v in enumerate(ids):
            if nxt[s, v] == DEAD:
                continue
            effect = token_effect(s, automaton.candidates[int(v)])
            if effect is None:
                bad[s, c] = True
                continue
            for name, value in effect.items():
                tables[name][s, c] = value
    # The closing budget must hold whatever x1 / y1 are: distances over the tokens that write only 9s into
    # x2 / y2 and end them at 3 digits (999 >= anything; a viable prefix completed with 9s stays viable).
    allowed_nxt = nxt.copy()
    allowed_nxt[:, ids] = np.where(bad, DEAD, nxt[:, ids])
    nines = lambda value, n: value == 10 ** n - 1  # noqa: E731
    safe = ~bad
    for a in ("a", "b"):
        k, n, v, end = (tables[f] for f in (f"k{a}", f"n{a}", f"v{a}", f"end{a}"))
        before = DIGITS_READ[:, None] if a == "a" else 0
        safe &= (k < 2) | (nines(v, n) & ((end == 0) | (before + n == 3)))
    worst_nxt = allowed_nxt.copy()
    worst_nxt[:, ids] = np.where(safe, nxt[:, ids], DEAD)
    worst_nxt[OUTSIDE], worst_nxt[CLOSED] = nxt[OUTSIDE], nxt[CLOSED]
    dist = distances_to_outside(worst_nxt)
    if dist[START] >= UNREACHABLE:
        raise TokenizerError("ordered boxes need tokens writing only 9s (e.g. '9') and a ',' or ']' token")
    cost = np.minimum(np.where(allowed_nxt == DEAD, UNREACHABLE, dist[allowed_nxt]), UNREACHABLE)
    index = np.full(nxt.shape[1], -1, dtype=np.int64)
    index[ids] = np.arange(len(ids))
    out = {name: torch.from_numpy(t) for name, t in tables.items()}
    out.update(bad=torch.from_numpy(bad), cost=torch.from_numpy(cost.astype(np.int16)), ids=torch.from_numpy(ids),
               index=torch.from_numpy(index), digits_read=torch.from_numpy(DIGITS_READ.copy()))
    return out


def _max_completion(value: torch.Tensor, digits: torch.Tensor, pow10: torch.Tensor) -> torch.Tensor:
    return (value + 1) * pow10[(3 - digits).clamp(min=0)] - 1


class OrderedBoxConstraint(BoxConstraint):
    """:class:`BoxConstraint` plus ``x1 <= x2`` and ``y1 <= y2`` (the comparison runs on the grammar's
    candidate tokens only, a few hundred to a few thousand columns)."""

    def __init__(self, automaton: BoxAutomaton, batch_size: int, device: torch.device | str) -> None:
        super().__init__(automaton, batch_size, device)
        self.t = {name: t.to(device) for name, t in ordered_tables(automaton).items()}
        self.cost = self.t["cost"]
        self.pow10 = torch.tensor([1, 10, 100, 1000], device=device)
        zeros = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.value, self.x1, self.y1 = zeros, zeros.clone(), zeros.clone()

    def _ordered(self, rows: dict[str, torch.Tensor], value: torch.Tensor, digits: torch.Tensor) -> torch.Tensor:
        """Which tokens keep x2 >= x1 and y2 >= y1 reachable; ``rows``: slot fields (B, C) or (B,)."""
        x1, y1 = (r.view(-1, *([1] * (rows["ka"].dim() - 1))) for r in (self.x1, self.y1))
        ref = lambda k: torch.where(k == 2, x1, y1)  # noqa: E731
        value_a = value * self.pow10[rows["na"]] + rows["va"]
        digits_a = digits + rows["na"]
        ok_a = (rows["ka"] < 2) | torch.where(rows["enda"].bool(), value_a >= ref(rows["ka"]),
                                               _max_completion(value_a, digits_a, self.pow10) >= ref(rows["ka"]))
        ok_b = (rows["kb"] < 2) | torch.where(rows["endb"].bool(), rows["vb"] >= ref(rows["kb"]),
                                               _max_completion(rows["vb"], rows["nb"], self.pow10) >= ref(rows["kb"]))
        return ok_a & ok_b

    def __call__(self, logits: torch.Tensor, remaining: int) -> torch.Tensor:
        s, t = self.state, self.t
        rows = {name: t[name].index_select(0, s) for name in FIELDS}  # (B, C) each
        ok = self._ordered(rows, self.value[:, None], t["digits_read"][s][:, None]) & ~t["bad"].index_select(0, s)
        allowed = self.cost.index_select(0, s) <= remaining - 1  # (B, V)
        allowed[:, t["ids"]] &= ok
        return logits.masked_fill(~allowed, float("-inf"))

    def advance(self, tokens: torch.Tensor) -> None:
        s, t = self.state, self.t
        c = t["index"][tokens]  # (B,) candidate column, -1 for any other token (outside a span)
        known = c >= 0
        f = {name: torch.where(known, t[name][s, c.clamp(min=0)], -1 if name in ("ka", "kb") else 0)
             for name in FIELDS}  # (B,) each
        value_a = self.value * self.pow10[f["na"]] + f["va"]
        ended_a, ended_b = f["enda"].bool(), f["endb"].bool()
        for k, reg in ((0, "x1"), (1, "y1")):
            new = torch.where((f["ka"] == k) & ended_a, value_a, getattr(self, reg))
            setattr(self, reg, torch.where((f["kb"] == k) & ended_b, f["vb"], new))
        has_b = f["kb"] >= 0
        keep_a = (f["ka"] >= 0) & ~ended_a
        self.value = torch.where(has_b, torch.where(ended_b, 0, f["vb"]), torch.where(keep_a, value_a, 0))
        super().advance(tokens)
