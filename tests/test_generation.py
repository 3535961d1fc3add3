"""Sampling rules (hand-computed), the generation loop's controls, and the Pipeline API."""

from __future__ import annotations

import pytest
import torch

import dsvl2
from dsvl2.errors import InputError
from dsvl2.generation.generate import GenerateArgs, generate
from dsvl2.generation.sampling import SamplingParams, apply_repetition_penalty, filter_top_k_top_p, sample
from golden_utils import outputs
from toy import toy_batch, toy_model


def test_repetition_penalty_matches_transformers_rule():
    logits = torch.tensor([[2.0, -2.0, 1.0, -1.0]])
    seen = torch.tensor([[True, True, False, False]])
    out = apply_repetition_penalty(logits, seen, 2.0)
    assert out.tolist() == [[1.0, -4.0, 1.0, -1.0]]  # positive / p, negative * p, unseen untouched


def test_top_k_and_top_p_filters_by_hand():
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.15, 0.1]]))
    assert torch.isinf(filter_top_k_top_p(logits, 2, 1.0)).tolist() == [[False, False, True, True]]
    # ascending cumulative: 0.1, 0.25, 0.5, 1.0; with top_p 0.7 drop those <= 0.3 -> ids 3 and 2
    assert torch.isinf(filter_top_k_top_p(logits, 0, 0.7)).tolist() == [[False, False, True, True]]
    # top_p tiny keeps the single most likely token
    assert torch.isinf(filter_top_k_top_p(logits, 0, 1e-6)).tolist() == [[False, True, True, True]]


def test_sampling_follows_the_distribution_and_seed():
    probs = torch.tensor([0.7, 0.2, 0.1])
    logits = probs.log().expand(20000, 3)
    g = torch.Generator().manual_seed(0)
    draws = sample(logits, SamplingParams(temperature=1.0), generator=g)
    freq = torch.bincount(draws, minlength=3).float() / draws.numel()
    torch.testing.assert_close(freq, probs, atol=0.02, rtol=0)
    a = sample(logits[:50], SamplingParams(temperature=1.0), generator=torch.Generator().manual_seed(5))
    b = sample(logits[:50], SamplingParams(temperature=1.0), generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
    assert sample(torch.tensor([[0.0, 3.0, 3.0]]), SamplingParams()).item() == 1  # greedy tie -> lowest id


def test_sampling_params_are_checked():
    for bad in (dict(temperature=-1), dict(top_p=0), dict(top_k=-2), dict(repetition_penalty=0)):
        with pytest.raises(InputError):
            SamplingParams(**bad)
    with pytest.raises(InputError, match="max_new_tokens"):
        GenerateArgs(max_new_tokens=0)


@pytest.fixture(scope="module")
def toy():
    return toy_model("mla", seed=11)


def _run(model, **kw):
    ids, mask, tiles, seq_mask, crop = toy_batch(model, seed=12, lengths=(15,))
    return [int(s.tokens[0]) for s in generate(model, ids, mask, tiles, seq_mask, crop, GenerateArgs(**kw), 1)]


def test_generation_controls(toy):
    assert len(_run(toy, max_new_tokens=5)) == 5
    greedy = _run(toy, max_new_tokens=8)
    assert _run(toy, max_new_tokens=8, temperature=0.7, top_k=1) == greedy  # top-1 sampling is greedy
    a = _run(toy, max_new_tokens=8, temperature=1.5, seed=1)
    assert a == _run(toy, max_new_tokens=8, temperature=1.5, seed=1)
    assert any(_run(toy, max_new_tokens=8, temperature=1.5, seed=s) != a for s in (2, 3, 4))
    penalised = _run(toy, max_new_tokens=8, repetition_penalty=1e6)
    assert len(set(penalised)) == len(penalised)  # nothing repeats under a huge penalty


def test_eos_stops_generation(toy):
    first = _run(toy, max_new_tokens=1)[0]
    ids, mask, tiles, seq_mask, crop = toy_batch(toy, seed=12, lengths=(15,))
    steps = list(generate(toy, ids, mask, tiles, seq_mask, crop, GenerateArgs(max_new_tokens=10), first))
    assert len(steps) == 1


def test_prompt_over_context_is_a_clear_error(toy):
    ids = torch.ones(1, 4097, dtype=torch.long)
    with pytest.raises(InputError, match="4097 tokens.*context limit of 4096"):
        next(generate(toy, ids, torch.ones_like(ids, dtype=torch.bool), None, None, None, GenerateArgs(), 1))


# ---- Pipeline (golden micro checkpoint + its real tokenizer) --------------------------------------
@pytest.fixture(scope="module")
def pipe(golden_dir):
    return dsvl2.load(golden_dir / "checkpoints" / "micro-mha", dtype="fp32", device="cpu")


def test_chat_stream_and_complete_agree(pipe, golden_dir):
    image = golden_dir / "images" / "tiny_20x20.png"
    text = pipe.chat("What is this?", images=[image], max_new_tokens=12)
    pieces = list(pipe.stream("What is this?", images=[image], max_new_tokens=12))
    assert "".join(pieces) == text and len(pieces) > 1
    done = pipe.complete("What is this?", images=[image], max_new_tokens=12)
    assert done.text == text and done.finish_reason == "length" and done.completion_tokens == 12
    # placeholders are added for images given without one (the official web demo's rule)
    explicit = pipe.chat("<image>\nWhat is this?", images=[image], max_new_tokens=12)
    assert explicit == text


def test_stop_strings_cut_the_answer(pipe):
    full = pipe.chat("Write a haiku about the sea.", max_new_tokens=16)
    stop = full[len(full) // 2: len(full) // 2 + 3]
    assert stop.strip()
    cut = pipe.complete("Write a haiku about the sea.", max_new_tokens=16, stop=[stop])
    assert cut.text == full[: full.index(stop)] and cut.finish_reason == "stop"
    assert "".join(pipe.stream("Write a haiku about the sea.", max_new_tokens=16, stop=[stop])) == cut.text


def test_batch_equals_single_answers(pipe, golden_dir):
    convs = ["Write a haiku about the sea.",
             [{"role": "user", "content": "<image>\nWhat is shown?", "images": [golden_dir / "images" / "tiny_20x20.png"]}],
             "Hi"]
    batch = pipe.generate_batch(convs, max_new_tokens=8)
    assert batch == [pipe.chat(c, max_new_tokens=8) for c in convs]


def test_pipeline_bad_input(pipe, golden_dir, tmp_path):
    image = golden_dir / "images" / "tiny_20x20.png"
    with pytest.raises(InputError, match="2 <image> placeholders but 1 image"):
        pipe.chat("<image><image> two?", images=[image])
    broken = tmp_path / "broken.png"
    broken.write_bytes(image.read_bytes()[:40])
    with pytest.raises(InputError, match="broken.png"):
        pipe.chat("what?", images=[broken])
    with pytest.raises(InputError, match="over the context limit of 4096"):
        pipe.chat("word " * 5000)
    with pytest.raises(InputError, match="dtype"):
        dsvl2.load(golden_dir / "checkpoints" / "micro-mha", dtype="int3")
    # after the refused inputs the pipeline still answers exactly as the official run did
    golden = outputs(golden_dir, "micro-mha", "fp32", "no_image")["generated_ids"][:6].tolist()
    done = pipe.complete("Write a haiku about the sea.", max_new_tokens=6, skip_special_tokens=False)
    assert done.token_ids == golden and done.text == pipe.tokenizer.decode(golden)
