"""DeepSeek-OCR's no-repeat n-gram rule: hand-computed bans and a crafted repetition loop."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from dsvl2.config import PRESETS
from dsvl2.errors import InputError
from dsvl2.generation import generate as gen_mod
from dsvl2.generation.generate import GenerateArgs, generate
from dsvl2.generation.norepeat import NoRepeatNGram, NoRepeatProcessor


def test_bans_the_token_that_would_repeat_an_ngram():
    rule = NoRepeatNGram(3, window_size=90)
    assert rule.banned([1, 2, 3, 1, 2]) == {3}  # (1, 2, 3) seen; the history ends in (1, 2)
    assert rule.banned([1, 2, 3, 1, 2, 4, 1, 2]) == {3, 4}
    assert rule.banned([1, 2]) == set()  # shorter than n: nothing
    assert rule.banned([1, 2, 3, 4, 5]) == set()


def test_window_and_whitelist():
    history = [1, 2, 3, 9, 9, 9, 1, 2]
    assert NoRepeatNGram(3, window_size=8).banned(history) == {3}
    assert NoRepeatNGram(3, window_size=7).banned(history) == set()  # the n-gram starts outside the window
    assert NoRepeatNGram(3, window_size=90, whitelist=frozenset({3})).banned(history) == set()


def test_apply_masks_only_banned_rows():
    logits = torch.zeros(2, 8)
    out = NoRepeatNGram(2).apply(logits, [[5, 6, 5], [1, 2, 3]])
    assert out[0, 6] == float("-inf") and torch.isfinite(out[0, :6]).all() and torch.isfinite(out[1]).all()
    assert torch.equal(logits, torch.zeros(2, 8))  # the input is not modified


def test_bad_settings_are_input_errors():
    with pytest.raises(InputError, match="no_repeat_ngram"):
        GenerateArgs(no_repeat_ngram=-1).no_repeat
    with pytest.raises(InputError, match="no_repeat_window"):
        GenerateArgs(no_repeat_ngram=3, no_repeat_window=0).no_repeat


CYCLE = [10, 11, 12, 13, 14]
ESCAPE = 20


def bigram_logits(last: torch.Tensor, vocab: int) -> torch.Tensor:
    """A model caught in a loop: after each cycle token the next one (logit 5), the escape token 1."""
    out = torch.zeros(last.shape[0], vocab)
    for r, t in enumerate(last.tolist()):
        nxt = CYCLE[(CYCLE.index(t) + 1) % len(CYCLE)] if t in CYCLE else CYCLE[0]
        out[r, nxt] = 5.0
        out[r, ESCAPE] = 1.0
    return out


def run(monkeypatch, **args) -> list[int]:
    lang = PRESETS["toy"].language_config
    model = SimpleNamespace(cfg=SimpleNamespace(language_config=lang), device=torch.device("cpu"),
                            dtype=torch.float32, prepare_inputs_embeds=lambda ids, *a: torch.zeros(*ids.shape, 1))
    monkeypatch.setattr(gen_mod, "prefill", lambda m, e, mask, *a: bigram_logits(torch.tensor([14]), lang.vocab_size))
    monkeypatch.setattr(gen_mod, "decode_one_token", lambda m, tok, *a: bigram_logits(tok, lang.vocab_size))
    ids = torch.tensor([[0, 14]])
    gen = GenerateArgs(max_new_tokens=9, **args)
    processors = [NoRepeatProcessor(gen.no_repeat, 1)] if gen.no_repeat else []  # as Pipeline.processors
    steps = generate(model, ids, torch.ones_like(ids, dtype=torch.bool), None, None, None, gen, eos_token_id=1,
                     processors=processors)
    return [int(s.tokens[0]) for s in steps]


def test_crafted_repetition_loop_is_broken(monkeypatch):
    assert run(monkeypatch) == [10, 11, 12, 13, 14, 10, 11, 12, 13]  # the loop, unchecked
    # (10, 11) was followed by 12 once: the rule bans 12 and the escape token wins; then the loop resumes.
    out = run(monkeypatch, no_repeat_ngram=3, no_repeat_window=90)
    assert out == [10, 11, 12, 13, 14, 10, 11, ESCAPE, 10]
    grams = [tuple(out[i:i + 3]) for i in range(len(out) - 2)]
    assert len(grams) == len(set(grams))
    # whitelisting 12 alone only moves the ban one step on: (11, 12) was followed by 13
    assert run(monkeypatch, no_repeat_ngram=3, no_repeat_whitelist=(12,)) == [10, 11, 12, 13, 14, 10, 11, 12, ESCAPE]
    assert run(monkeypatch, no_repeat_ngram=3, no_repeat_whitelist=tuple(CYCLE)) == run(monkeypatch)
