"""Self-consistency of the model and generation loop on toy models with random weights.

cached decode == full forward; chunked prefill == one-shot; absorbed MLA == expanded MLA over the
whole model; a left-padded batch == its rows one by one.
"""

from __future__ import annotations

import pytest
import torch

from dsvl2.generation.generate import GenerateArgs, decode_one_token, generate, prefill
from dsvl2.model.cache import make_cache
from dsvl2.model.plan import EXACT, Plan, apply
from toy import toy_batch, toy_model

VARIANTS = ("mla", "mha", "noaux")


@pytest.fixture(scope="module", params=VARIANTS)
def model(request):
    return toy_model(request.param, seed=1)


def _embeds(model, ids, mask, tiles, seq_mask, crop):
    with torch.no_grad():
        return model.prepare_inputs_embeds(ids, tiles, seq_mask, crop)


def test_cached_decode_equals_full_forward(model):
    ids, mask, tiles, seq_mask, crop = toy_batch(model, seed=2, lengths=(30,))
    extra = torch.randint(3, 1000, (1, 5), generator=torch.Generator().manual_seed(3))
    full_ids = torch.cat([ids, extra], dim=1)
    full_mask = torch.ones_like(full_ids, dtype=torch.bool)
    full_seq = torch.cat([seq_mask, torch.zeros(1, 5, dtype=torch.bool)], dim=1)
    with torch.no_grad():
        full = model(full_ids, full_mask, tiles, full_seq, crop)  # (1, T+5, V)
    cache = make_cache(model.cfg.language_config, 1, full_ids.shape[1], torch.float32, "cpu")
    logits = [prefill(model, _embeds(model, ids, mask, tiles, seq_mask, crop), mask, cache)]
    m = mask
    for k in range(4):
        m = torch.cat([m, torch.ones(1, 1, dtype=torch.bool)], dim=1)
        logits.append(decode_one_token(model, extra[:, k], m, cache))
    t = ids.shape[1]
    for k, step in enumerate(logits):
        torch.testing.assert_close(step[0], full[0, t - 1 + k], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("chunk", [1, 7, 64])
def test_chunked_prefill_equals_one_shot(model, chunk):
    ids, mask, tiles, seq_mask, crop = toy_batch(model, seed=4, lengths=(20,))
    embeds = _embeds(model, ids, mask, tiles, seq_mask, crop)
    t = ids.shape[1]
    one = prefill(model, embeds, mask, make_cache(model.cfg.language_config, 1, t, torch.float32, "cpu"))
    cache = make_cache(model.cfg.language_config, 1, t, torch.float32, "cpu")
    chunked = prefill(model, embeds, mask, cache, chunk_size=chunk)
    torch.testing.assert_close(chunked, one, atol=1e-4, rtol=1e-4)
    assert cache.length == t


def test_expanded_mla_equals_absorbed_whole_model():
    model = toy_model("mla", seed=5)
    ids, mask, tiles, seq_mask, crop = toy_batch(model, seed=6, lengths=(25,))
    with torch.no_grad():
        absorbed = model(ids, mask, tiles, seq_mask, crop)
        expanded = model(ids, mask, tiles, seq_mask, crop, expanded=True)
    torch.testing.assert_close(expanded, absorbed, atol=1e-4, rtol=1e-4)
    # and an expanded prefill followed by absorbed decode gives the same tokens as all-absorbed
    args = dict(max_new_tokens=6)
    a = [s.tokens.tolist() for s in generate(model, ids, mask, tiles, seq_mask, crop, GenerateArgs(**args), 1)]
    apply(model, Plan(fused_attention=True))  # expanded prefill; decode stays absorbed (MLA's one-token rule)
    e = [s.tokens.tolist() for s in generate(model, ids, mask, tiles, seq_mask, crop, GenerateArgs(**args), 1)]
    apply(model, EXACT)
    assert a == e


def test_left_padded_batch_equals_single_rows(model):
    lengths = (12, 30, 21)
    ids, mask, tiles, seq_mask, crop = toy_batch(model, seed=7, lengths=lengths)
    batch_steps = list(generate(model, ids, mask, tiles, seq_mask, crop, GenerateArgs(max_new_tokens=6), 1,
                                return_logits=True))
    for r in range(len(lengths)):
        keep = mask[r]
        single = list(generate(model, ids[r:r + 1, keep], mask[r:r + 1, keep], tiles[r:r + 1],
                               seq_mask[r:r + 1, keep], crop[r:r + 1], GenerateArgs(max_new_tokens=6), 1,
                               return_logits=True))
        assert [int(s.tokens[0]) for s in single] == [int(s.tokens[r]) for s in batch_steps[:len(single)]]
        for a, b in zip(single, batch_steps):
            torch.testing.assert_close(b.logits[r], a.logits[0], atol=1e-4, rtol=1e-4)


def test_cache_bytes_per_token_is_latent_minimum():
    model = toy_model("mla")
    lc = model.cfg.language_config
    cache = make_cache(lc, 1, 8, torch.bfloat16, "cpu")
    assert cache.bytes_per_token == lc.num_hidden_layers * (lc.kv_lora_rank + lc.qk_rope_head_dim) * 2


@pytest.mark.parametrize("variant", ["mla", "mha"])
def test_query_blocked_reference_attention_is_bit_identical(variant, monkeypatch):
    """CPU prefill attends in blocks of query rows; the numbers are those of one pass, bit for bit (bf16)."""
    from dsvl2.model import attention

    model = toy_model(variant, seed=8, dtype=torch.bfloat16)
    ids, mask, tiles, seq_mask, crop = toy_batch(model, seed=9, lengths=(37, 50))
    with torch.no_grad():
        whole = model(ids, mask, tiles.bfloat16(), seq_mask, crop)
        monkeypatch.setattr(attention, "CPU_QUERY_BLOCK", 16)  # several blocks, the last one partial
        blocked = model(ids, mask, tiles.bfloat16(), seq_mask, crop)
    assert ids.shape[1] > 3 * 16
    assert torch.equal(blocked, whole)
