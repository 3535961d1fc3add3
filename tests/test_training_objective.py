"""The training objective against independent computations (STYLE "Tests", item 1).

- Packed batch vs. hand-written cross-entropy: real conversations (images, a system prompt, two
  turns) go through the processor and the packer into two packed rows; the loss of
  ``training.loop.forward_loss`` must equal a cross-entropy written out here: labels rebuilt from the
  official rule (``process_one`` of DeepSeek-VL2: the tokens of each assistant answer and its EOS are
  targets, everything else -100) by locating ``encode(answer) + [eos]`` in the ids, each sample run
  *alone* (no packing, no block mask), ``-log p(token j | tokens < j)`` summed over the targets of the
  whole global batch and divided by their count. Split over two simulated processes it gives the
  same value.
- Text part vs. transformers: the same weights in ``DeepseekV2ForCausalLM`` (Small's softmax gate)
  and ``DeepseekV3ForCausalLM`` (Base's noaux_tc gate), given the same labels, report the same loss
  (their ``ForCausalLMLoss``: shift, ignore -100, mean over labelled tokens), and one backward gives
  the same gradient for every weight, compared under the official key names.
- The MoE sequence-balance loss against the official ``MoEGate`` formula on a case worked by hand.

Tolerances: fp32 on both sides with different summation orders (SDPA vs eager, block mask vs plain
causal mask, grouped vs per-expert GEMMs). Observed: the packed loss 5e-8 from the hand value (loss
5.94 over 63 targets); the transformers losses equal to the bit; gradients within 3e-6 of each
weight's largest gradient entry. A shifted label, a wrong normaliser or a leaking packed sample moves
the loss by 1e-2 or more.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from dsvl2.checkpoint import iter_official_tensors
from dsvl2.config import PRESETS
from dsvl2.model.moe import MoE
from dsvl2.training.data import IGNORE_INDEX, ConversationDataset, Example, TokenizedSample, collate, pack
from dsvl2.training.loop import forward_loss, set_aux_alpha
from dsvl2.training.stages import StageConfig

from training_helpers import make_examples, make_model, make_processor

LOSS_TOL = dict(atol=1e-5, rtol=1e-5)
STAGE = StageConfig(stage=3, aux_loss_alpha=0.0, mixture={"demo": 1.0})


# ---- packed batch vs. a hand-written cross-entropy ------------------------------------------------------
@pytest.fixture(scope="module")
def conversations(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("objective")
    processor = make_processor(root / "tok")
    examples = make_examples(root / "data", n_per_task=1)  # grounding, reading, charts: one image each
    images = [m["images"][0] for e in examples for m in e.messages if m.get("images")]
    multi_turn = ({"role": "system", "content": "Answer briefly."},
                  {"role": "user", "content": "<image>\nWhat is shown?", "images": [images[2]]},
                  {"role": "assistant", "content": "a bar chart"},
                  {"role": "user", "content": "And here? <image>", "images": [images[1]]},
                  {"role": "assistant", "content": "a word: cookie"})
    text_only = ({"role": "user", "content": "Say hello."}, {"role": "assistant", "content": "hello there"})
    examples = examples + [Example(multi_turn, Path("hand"), 1), Example(text_only, Path("hand"), 2)]
    samples = [ConversationDataset([e], processor)[0] for e in examples]
    return processor, [list(e.messages) for e in examples], samples


def official_labels(ids: list[int], messages: list[dict], tokenizer) -> list[int]:
    """The official rule, applied to the ids: each answer's ``encode(text) + [eos]`` is a target."""
    labels = [IGNORE_INDEX] * len(ids)
    assistant = tokenizer.token_id("<|Assistant|>")
    turns = [i for i, t in enumerate(ids) if t == assistant]
    answers = [m["content"].strip() for m in messages if m["role"] == "assistant"]
    assert len(turns) == len(answers)
    for start, answer in zip(turns, answers):
        span = tokenizer.encode(answer) + [tokenizer.eos_id]
        at = next(j for j in range(start + 1, len(ids)) if ids[j:j + len(span)] == span)
        assert at - start <= 2, "the answer must follow its '<|Assistant|>:' header"
        labels[at:at + len(span)] = span
    return labels


def hand_cross_entropy(model, samples, label_rows) -> tuple[float, int]:
    """Sum of -log p(label_j | ids_<j) over every target of every sample run alone; and the count."""
    total, count = 0.0, 0
    for s, labels in zip(samples, label_rows):
        logits = model(s.input_ids[None], None, s.images[None], s.images_seq_mask[None],
                       s.images_spatial_crop[None], expanded=True)[0]  # (T, V), plain causal mask
        logp = logits.double().log_softmax(-1)
        for j, target in enumerate(labels):
            if target != IGNORE_INDEX:
                total -= float(logp[j - 1, target])
                count += 1
    return total, count


@torch.no_grad()
def test_packed_loss_equals_hand_cross_entropy_over_official_labels(conversations):
    processor, messages, samples = conversations
    tok = processor.tokenizer
    label_rows = [official_labels(s.input_ids.tolist(), m, tok) for s, m in zip(samples, messages)]
    for s, labels in zip(samples, label_rows):  # what the processor made (position 0: BOS, never a target)
        assert s.labels[1:].tolist() == labels[1:], s.source
    model = make_model(seed=3).train()
    set_aux_alpha(model, 0.0)
    ce_sum, n = hand_cross_entropy(model, samples, label_rows)
    assert n > 40 and math.isfinite(ce_sum)

    rows = pack(samples, max_length=360)
    assert len(rows) == 2 and max(len(r.sources) for r in rows) >= 3, [r.sources for r in rows]
    batch = collate(rows, tok.pad_id)
    assert int((batch.labels[:, 1:] != IGNORE_INDEX).sum()) == n  # the loop's count of the global batch
    loss, summed, aux = forward_loss(model, batch, STAGE, global_tokens=n)
    assert float(aux) == 0.0
    torch.testing.assert_close(loss.double(), torch.tensor(ce_sum / n, dtype=torch.float64), **LOSS_TOL)
    torch.testing.assert_close(summed.double(), torch.tensor(ce_sum, dtype=torch.float64), atol=1e-3, rtol=1e-5)

    # Two processes, one packed row each: the mean of their backward losses is the global mean.
    halves = [forward_loss(model, collate([r], tok.pad_id), STAGE, global_tokens=n, world=2)[0] for r in rows]
    torch.testing.assert_close(((halves[0] + halves[1]) / 2).double(),
                               torch.tensor(ce_sum / n, dtype=torch.float64), **LOSS_TOL)


# ---- text part vs. transformers: loss and gradients ---------------------------------------------------
def text_batch(vocab: int, lengths=(14, 9, 11), seed: int = 1):
    """Right-padded text rows with a masked prompt (first 5 tokens -100) and a labelled answer."""
    g = torch.Generator().manual_seed(seed)
    samples = []
    for n in lengths:
        ids = torch.randint(3, vocab, (n,), generator=g)
        labels = ids.clone()
        labels[:5] = IGNORE_INDEX
        samples.append(TokenizedSample(ids, labels, torch.zeros(n, dtype=torch.bool), torch.zeros(0, 3, 98, 98),
                                       torch.zeros(0, 2, dtype=torch.long), f"row{len(samples)}"))
    return collate(samples, pad_id=2)


def official_grads(model) -> dict[str, torch.Tensor]:
    """Our gradients under the official keys, mapped by the same exporter as the weights."""
    grads = {k: (p.grad if p.grad is not None else torch.zeros_like(p)) for k, p in model.named_parameters()}
    grads.update({k: torch.zeros_like(b) for k, b in model.named_buffers() if k not in grads})
    return dict(iter_official_tensors(SimpleNamespace(state_dict=lambda: grads)))


@pytest.mark.parametrize("flavour", ["small", "base"])
def test_text_loss_and_gradients_match_transformers(flavour):
    pytest.importorskip("transformers")
    from reference import adapters
    from test_reference import BASE_FIELDS, VOCAB, build, config

    model = build(config(**({} if flavour == "small" else BASE_FIELDS)), seed=5)
    ref = adapters.deepseek_v2_causal_lm(model) if flavour == "small" else adapters.deepseek_v3_causal_lm(model)
    model.train()
    set_aux_alpha(model, 0.0)  # transformers' gates have no balance loss; it is checked on its own below
    batch = text_batch(VOCAB)
    n = int((batch.labels[:, 1:] != IGNORE_INDEX).sum())
    ours, _, _ = forward_loss(model, batch, STAGE, global_tokens=n)
    theirs = ref(input_ids=batch.input_ids, attention_mask=batch.attention_mask.long(), labels=batch.labels).loss
    torch.testing.assert_close(ours, theirs, **LOSS_TOL)
    ours.backward()
    theirs.backward()
    mine = official_grads(model)
    compared = 0
    for name, p in ref.named_parameters():
        g = mine["language." + name]
        assert p.grad is not None and p.grad.abs().max() > 0, name
        # fp32 sums of the same products in other orders (other GEMM kernels: AVX512 or AVX2, ours or
        # transformers' layouts): measured up to 1.0e-6 (AVX512) and 1.3e-6 (AVX2) of the largest entry
        torch.testing.assert_close(g, p.grad, atol=3e-6 * float(p.grad.abs().max()) + 1e-9, rtol=1e-4, msg=name)
        compared += 1
    assert compared > 30


# ---- MoE sequence-balance loss: the official formula on a hand case ---------------------------------
def test_balance_loss_matches_the_official_formula_by_hand():
    """Official ``MoEGate`` with ``seq_aux``: per sequence ``ce_e = count_e / (T * k / E)`` and
    ``P_e = mean_t score_te``; ``aux = alpha * mean_b sum_e ce_e * P_e``.

    E = 4 experts, k = 2, D = 4, router weight = log of a table, inputs one-hot: token ``e_d`` gets the
    softmax of column d. Column 0 -> scores (1/2, 1/4, 1/8, 1/8), top-2 {0, 1}; column 3 ->
    (1/8, 1/8, 1/4, 1/2), top-2 {3, 2}.
    Sequence 1 = (col 0, col 0): counts (2, 2, 0, 0), ce = counts / (2*2/4) = (2, 2, 0, 0),
      P = (1/2, 1/4, 1/8, 1/8), sum ce*P = 1 + 1/2 = 1.5.
    Sequence 2 = (col 0, col 3): counts (1, 1, 1, 1), ce = (1, 1, 1, 1), P = (5/16, 3/16, 3/16, 5/16),
      sum = 1.
    aux = alpha * (1.5 + 1) / 2 = 1.25 alpha. A third, padded position in sequence 2 (balance_mask
    False) changes nothing.
    """
    cfg = dataclasses.replace(PRESETS["toy"].language_config, hidden_size=4, n_routed_experts=4,
                              num_experts_per_tok=2, moe_intermediate_size=4, aux_loss_alpha=0.01, seq_aux=True)
    moe = MoE(cfg).train()
    table = torch.tensor([[4.0, 1.0, 1.0, 1.0], [2.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 2.0], [1.0, 1.0, 1.0, 4.0]])
    with torch.no_grad():
        moe.gate.weight.copy_(table.log())  # (E, D): logits of one-hot token d = log column d
    eye = torch.eye(4)
    x = torch.stack([torch.stack([eye[0], eye[0]]), torch.stack([eye[0], eye[3]])])  # (B=2, T=2, D)
    moe(x)
    assert moe.last_aux_loss.item() == pytest.approx(1.25 * 0.01, rel=1e-6)
    assert moe.last_expert_counts.tolist() == [3.0, 3.0, 1.0, 1.0]
    padded = torch.cat([x, torch.stack([eye[3], eye[1]])[:, None]], dim=1)  # (2, 3, D)
    moe.balance_mask = torch.tensor([[True, True, False], [True, True, False]])
    moe(padded)
    assert moe.last_aux_loss.item() == pytest.approx(1.25 * 0.01, rel=1e-6)
