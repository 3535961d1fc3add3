"""Box-constrained decoding: the automaton on a hand-made vocabulary, random walks through the mask,
and the real generation loop on the golden micro checkpoint (random weights, real tokenizer) and the
shipped demo model."""

import re
from random import Random

import pytest
import torch

import dsvl2
from dsvl2.demo import MODEL_DIR
from dsvl2.errors import TokenizerError
from dsvl2.generation.constraints import (
    CLOSED,
    DEAD,
    LIST,
    NUM,
    OUTSIDE,
    START,
    BoxConstraint,
    box_automaton,
    build_box_automaton,
)
from dsvl2.processing.grounding import parse_grounding

# a vocabulary of 24 tokens: the grammar's characters alone and in pairs, plus distractors
VOCAB = ["[", "]", ",", " ", *"0123456789", "[[", "]]", ", ", "12", "abc", "<|det|>", "<|/det|>", "<eos>", "",
         "1000"]
DET, DET_END, EOS = VOCAB.index("<|det|>"), VOCAB.index("<|/det|>"), VOCAB.index("<eos>")


def broken(text):
    """Parse problems other than corners out of order (which the parser repairs by sorting)."""
    return [e for e in parse_grounding(text).errors if "swapped" not in e]


_LIST = r"\[\d{1,3}, ?\d{1,3}, ?\d{1,3}, ?\d{1,3}\]"
BOX = re.compile(rf"<\|det\|>\[{_LIST}(, ?{_LIST})*\]<\|/det\|>")


@pytest.fixture(scope="module")
def toy_automaton():
    return build_box_automaton(VOCAB, len(VOCAB) + 2, DET, DET_END)  # two ids past the tokenizer's list


def test_transitions_and_costs_by_hand(toy_automaton):
    nxt, cost = toy_automaton.next_state, toy_automaton.cost
    assert int(nxt[OUTSIDE, DET]) == START and int(nxt[OUTSIDE, VOCAB.index("abc")]) == OUTSIDE
    assert int(nxt[START, VOCAB.index("[[")]) == NUM[0][0]
    assert int(nxt[START, VOCAB.index("[")]) == LIST
    assert int(nxt[START, VOCAB.index("abc")]) == DEAD and int(nxt[START, EOS]) == DEAD
    assert int(nxt[NUM[0][0], VOCAB.index("12")]) == NUM[0][2]
    assert int(nxt[NUM[0][2], VOCAB.index("12")]) == DEAD  # a fourth digit: 1212 > 999
    assert int(nxt[NUM[0][0], VOCAB.index("1000")]) == DEAD
    assert int(nxt[NUM[0][0], VOCAB.index(",")]) == DEAD  # an empty coordinate
    assert int(nxt[NUM[3][1], VOCAB.index("]]")]) == CLOSED
    assert int(nxt[NUM[2][1], VOCAB.index("]]")]) == DEAD  # a box of three numbers
    assert int(nxt[CLOSED, DET_END]) == OUTSIDE and int(nxt[CLOSED, EOS]) == DEAD
    assert int(nxt[START, VOCAB.index("")]) == DEAD  # a token writing nothing never extends a span
    assert int(nxt[START, len(VOCAB)]) == DEAD and int(nxt[OUTSIDE, len(VOCAB) + 1]) == OUTSIDE
    # fewest tokens from just after <|det|> back outside: [[ 0 , 0 , 0 , 0 ]] <|/det|> = 10
    assert int(cost[OUTSIDE, DET]) == 10
    # without the two-character tokens it takes 12: [ [ 0 , 0 , 0 , 0 ] ] <|/det|>
    plain = build_box_automaton([v if v not in ("[[", "]]") else "x" for v in VOCAB], len(VOCAB), DET, DET_END)
    assert int(plain.cost[OUTSIDE, DET]) == 12


def test_a_tokenizer_without_box_characters_is_refused():
    with pytest.raises(TokenizerError, match="box-constrained decoding is impossible"):
        build_box_automaton(["a", "b", "<|det|>", "<|/det|>"], 4, 2, 3)


def _text(ids):
    return "".join(VOCAB[i] if i < len(VOCAB) else "" for i in ids)


@pytest.mark.parametrize("budget", [11, 14, 40])
def test_random_walks_always_close_a_valid_box_list(toy_automaton, budget):
    """Sampling uniformly among the allowed tokens (a det forced first) always ends outside, parsable,
    even with a budget that leaves one token to spare."""
    g = torch.Generator().manual_seed(budget)
    rows = 64
    proc = BoxConstraint(toy_automaton, rows, "cpu")
    proc.advance(torch.full((rows,), DET))
    out = [[DET] for _ in range(rows)]
    for remaining in range(budget - 1, 0, -1):
        logits = proc(torch.zeros(rows, len(VOCAB) + 2), remaining)
        probs = torch.isfinite(logits).float()
        assert bool((probs.sum(-1) > 0).all())
        token = torch.multinomial(probs, 1, generator=g)[:, 0]
        proc.advance(token)
        for r, t in enumerate(token.tolist()):
            out[r].append(t)
    assert bool((proc.state == OUTSIDE).all())
    for ids in out:
        text = _text(ids)
        head = text[: text.index("<|/det|>") + len("<|/det|>")]
        assert BOX.fullmatch(head), text
        assert broken(head) == [] and parse_grounding(head).boxes
        assert toy_automaton.accepts(ids)


def test_no_box_list_is_opened_without_room_to_close(toy_automaton):
    proc = BoxConstraint(toy_automaton, 1, "cpu")
    assert torch.isinf(proc(torch.zeros(1, len(VOCAB) + 2), 10)[0, DET])  # 10 left: 1 for det + 10 needed
    assert torch.isfinite(proc(torch.zeros(1, len(VOCAB) + 2), 11)[0, DET])


# ---- the real loop ------------------------------------------------------------------------------------
class ForceFirst:
    """A test processor through the same hook: the first generated token of every row is ``token_id``."""

    def __init__(self, token_id: int) -> None:
        self.token_id, self.first = token_id, True

    def __call__(self, logits, remaining):
        if not self.first:
            return logits
        forced = torch.full_like(logits, float("-inf"))
        forced[:, self.token_id] = 0.0
        return forced

    def advance(self, tokens):
        self.first = False


@pytest.fixture(scope="module")
def micro(golden_dir):
    return dsvl2.load(golden_dir / "checkpoints" / "micro-mla", dtype="fp32", device="cpu")


def _forced_det(pipe, constrained, batch_rows=3, **gen):
    from dsvl2.generation.generate import GenerateArgs

    convs = [pipe.conversation(f"Where is object {i}?") for i in range(batch_rows)]
    batch = pipe.prepare(convs)
    args = GenerateArgs(constrain_boxes=constrained, **gen)
    original = pipe.processors
    pipe.processors = lambda a, b: [ForceFirst(pipe.tokenizer.det_id), *original(a, b)]
    try:
        return [c.text for c in pipe._run(batch, args, (), skip_special_tokens=False)]
    finally:
        del pipe.processors


@pytest.mark.parametrize("gen", [{}, {"temperature": 1.0, "seed": 3}, {"temperature": 1.5, "top_p": 0.9, "seed": 4}])
def test_random_weights_write_parsable_boxes_only_with_the_constraint(micro, gen):
    free = _forced_det(micro, False, max_new_tokens=24, **gen)
    assert not any(BOX.match(t) for t in free)  # random weights never write a box on their own
    boxed = _forced_det(micro, True, max_new_tokens=24, **gen)
    for text in boxed:
        assert BOX.match(text), text
        assert broken(text) == []


def test_constraint_is_cached_per_tokenizer(micro):
    a = box_automaton(micro.tokenizer, micro.model.cfg.language_config.vocab_size)
    assert box_automaton(micro.tokenizer, micro.model.cfg.language_config.vocab_size) is a
    assert a.next_state.shape == (DEAD + 1, micro.model.cfg.language_config.vocab_size)


shipped = pytest.mark.skipif(not (MODEL_DIR / "config.json").is_file(), reason="demo model not built")


@shipped
def test_demo_model_greedy_unchanged_when_valid_and_sampling_always_parses():
    from dsvl2.demo.tasks import make_grounding

    torch.set_num_threads(1)
    pipe = dsvl2.load(dtype="fp32", device="cpu")
    rng = Random("dsvl2-test-constraints")
    samples = [make_grounding(rng) for _ in range(6)]
    convs = [[{"role": "user", "content": s.prompt, "images": [s.image]}] for s in samples]
    free = pipe.generate_batch(convs, max_new_tokens=40, skip_special_tokens=False)
    boxed = pipe.generate_batch(convs, max_new_tokens=40, skip_special_tokens=False, constrain_boxes=True)
    valid = [bool(BOX.search(t)) and not broken(t) for t in free]
    assert any(valid)
    for v, f, b in zip(valid, free, boxed):
        if v:
            assert b == f
        assert BOX.search(b) and broken(b) == [], b
    hot = pipe.generate_batch(convs, max_new_tokens=40, skip_special_tokens=False, constrain_boxes=True,
                              temperature=1.5, seed=7)
    for text in hot:
        assert "<|det|>" not in text or (BOX.search(text) and broken(text) == []), text
    result = pipe.ground(samples[0].image, "the " + samples[0].prompt.split("the ", 1)[1].split("<|/ref|>")[0],
                         temperature=1.5, seed=1)
    assert [e for e in result.errors if "swapped" not in e] == []


def test_constraint_is_on_by_default_in_ground_cli_and_server_requests():
    from dsvl2.cli import build_parser
    from dsvl2.serving.protocol import APIError, ChatRequest

    parser = build_parser()
    assert parser.parse_args(["ground", "--image", "x.png", "the cat"]).constrain_boxes is True
    assert parser.parse_args(["ground", "--image", "x.png", "the cat", "--no-constrain-boxes"]).constrain_boxes is False
    assert parser.parse_args(["chat", "hi"]).constrain_boxes is False
    assert parser.parse_args(["chat", "hi", "--constrain-boxes"]).constrain_boxes is True
    body = {"messages": [{"role": "user", "content": "hi"}]}
    assert ChatRequest.from_json(body).constrain_boxes is True
    assert ChatRequest.from_json({**body, "constrain_boxes": False}).constrain_boxes is False
    with pytest.raises(APIError, match="constrain_boxes"):
        ChatRequest.from_json({**body, "constrain_boxes": "yes"})
