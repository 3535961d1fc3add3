"""Ordered corners (x1 <= x2, y1 <= y2): random walks through the mask on a hand-made vocabulary (with
tokens that span two numbers) and on the real tokenizer's candidates, always closing in time; the
register arithmetic on hand-computed prefixes; the demo model end to end."""

import re

import pytest
import torch

import dsvl2
from dsvl2.demo import MODEL_DIR
from dsvl2.generation.box_order import OrderedBoxConstraint, token_effect
from dsvl2.generation.constraints import NUM, OUTSIDE, SEP, build_box_automaton
from dsvl2.processing.grounding import parse_grounding

VOCAB = ["[", "]", ",", " ", *"0123456789", "[[", "]]", ", ", "12", "99", "5, 6", "1,2,3", "], [", "<|det|>",
         "<|/det|>", "<eos>", "abc"]
DET, DET_END = VOCAB.index("<|det|>"), VOCAB.index("<|/det|>")


def boxes_of(text):
    return [[int(v) for v in b.split(",")] for b in re.findall(r"\[(\d+, ?\d+, ?\d+, ?\d+)\]", text)]


def test_token_effects_by_hand():
    assert token_effect(NUM[1][1], "5, 6") == {"ka": 1, "na": 1, "va": 5, "enda": 1, "kb": 2, "nb": 1, "vb": 6,
                                               "endb": 0}
    assert token_effect(NUM[2][2], "]]") is not None and token_effect(NUM[3][2], "]]")["enda"] == 1
    assert token_effect(SEP[2], " ") == {"ka": 2, "na": 0, "va": 0, "enda": 0, "kb": -1, "nb": 0, "vb": 0, "endb": 0}
    assert token_effect(NUM[0][1], "1,2,3") is None  # writes three numbers: not used in ordered mode


def _walk(automaton, texts, budget, rows, seed):
    g = torch.Generator().manual_seed(seed)
    vocab = automaton.next_state.shape[1]
    proc = OrderedBoxConstraint(automaton, rows, "cpu")
    proc.advance(torch.full((rows,), automaton.det_id))
    out = ["<|det|>"] * rows
    for remaining in range(budget - 1, 0, -1):
        logits = proc(torch.zeros(rows, vocab), remaining)
        allowed = torch.isfinite(logits)
        assert bool(allowed.any(-1).all())
        token = torch.multinomial(allowed.float(), 1, generator=g)[:, 0]
        proc.advance(token)
        out = [o + texts[t] for o, t in zip(out, token.tolist())]
    assert bool((proc.state == OUTSIDE).all())
    return out


@pytest.mark.parametrize("budget", [15, 20, 60])
def test_random_walks_give_ordered_boxes(budget):
    automaton = build_box_automaton(VOCAB, len(VOCAB), DET, DET_END)
    for text in _walk(automaton, VOCAB, budget, 64, budget):
        head = text[: text.index("<|/det|>") + 8]
        result = parse_grounding(head)
        assert result.boxes and result.errors == [], head  # no swapped corners reported
        assert all(x1 <= x2 and y1 <= y2 for x1, y1, x2, y2 in boxes_of(head)), head
        assert "1,2,3" not in head


def test_random_walks_on_the_real_tokenizer(golden_dir):
    pipe = dsvl2.load(golden_dir / "checkpoints" / "micro-mla", dtype="fp32", device="cpu")
    from dsvl2.generation.constraints import box_automaton

    automaton = box_automaton(pipe.tokenizer, pipe.model.cfg.language_config.vocab_size)
    texts = pipe.tokenizer.token_texts() + [""] * (automaton.next_state.shape[1] - pipe.tokenizer.vocab_size)
    for text in _walk(automaton, texts, 30, 16, 1):
        head = text[: text.index("<|/det|>") + 8]
        assert parse_grounding(head).errors == [] and all(
            x1 <= x2 and y1 <= y2 for x1, y1, x2, y2 in boxes_of(head)), head


def test_prefix_viability_by_hand():
    automaton = build_box_automaton(VOCAB, len(VOCAB), DET, DET_END)
    proc = OrderedBoxConstraint(automaton, 1, "cpu")
    for tok in ["<|det|>", "[[", "5", "0", "0", ", ", "12", ", "]:  # x1 = 500, y1 = 12, now at x2
        proc.advance(torch.tensor([VOCAB.index(tok)]))
    assert (int(proc.x1), int(proc.y1)) == (500, 12)
    ok = torch.isfinite(proc(torch.zeros(1, len(VOCAB)), 100))[0]
    # x2 may start with 5-9 ("5" can still become 500-599), not 1-4 (at most 499) nor "12" (at most 129)
    assert [d for d in "0123456789" if ok[VOCAB.index(d)]] == list("56789")
    assert not ok[VOCAB.index("12")] and ok[VOCAB.index("99")]
    proc.advance(torch.tensor([VOCAB.index("5")]))
    ok = torch.isfinite(proc(torch.zeros(1, len(VOCAB)), 100))[0]
    assert not ok[VOCAB.index(",")] and not ok[VOCAB.index("5, 6")]  # x2 = 5 < 500 cannot end here
    assert ok[VOCAB.index("0")]


@pytest.mark.skipif(not (MODEL_DIR / "config.json").is_file(), reason="demo model not built")
def test_demo_model_ordered_boxes_when_sampling_hot():
    from random import Random

    from dsvl2.demo.tasks import make_grounding

    torch.set_num_threads(1)
    pipe = dsvl2.load(dtype="fp32", device="cpu")
    samples = [make_grounding(Random(f"order-{i}")) for i in range(8)]
    convs = [[{"role": "user", "content": s.prompt, "images": [s.image]}] for s in samples]
    texts = pipe.generate_batch(convs, max_new_tokens=40, skip_special_tokens=False, ordered_boxes=True,
                                temperature=1.5, seed=3)
    for text in texts:
        if "<|det|>" in text:
            assert parse_grounding(text).errors == [], text


def test_ground_cli_passes_ordered_boxes():
    from dsvl2.cli import build_parser

    args = build_parser().parse_args(["ground", "--image", "x.png", "the cat", "--ordered-boxes"])
    assert args.ordered_boxes is True and args.constrain_boxes is True
