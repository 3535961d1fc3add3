"""Parity with independent PyPI implementations (transformers) sharing our random weights.

STYLE "Tests" item 1. A toy model is built with a fixed seed and non-trivial random weights, exported
through ``dsvl2.checkpoint`` into the official layout, mapped into a transformers module by
``tests/reference/adapters.py`` (the only file that knows transformers' keys) with ``strict=True``,
and both run in fp32 on the same random inputs:

- vision tower vs ``SiglipVisionModel.last_hidden_state`` (odd 7x7 grid, with and without the
  dropped-pixel remainder of the real 384 = 27*14 + 6 tiles);
- Tiny: ``MHA`` vs ``LlamaAttention``; greedy softmax ``MoE`` vs ``DeepseekV2MoE`` (as modules: Llama
  attention with a DeepSeek MoE is no transformers class, so Tiny has no whole-model reference);
- Small: MLA (absorbed and expanded) vs ``DeepseekV2Attention``; whole toy language model vs
  ``DeepseekV2ForCausalLM`` logits, with a left-padded row;
- Base: noaux_tc sigmoid ``MoE`` (renormalised, x2.0, non-zero correction bias) vs ``DeepseekV3MoE``;
  MLA vs ``DeepseekV3Attention`` (``rope_interleave=True``); whole model vs ``DeepseekV3ForCausalLM``.

Tolerances: atol 1e-5, rtol 1e-4 everywhere. Both sides compute the same math in fp32 with different
summation orders (SDPA vs eager softmax, complex vs real RoPE, absorbed vs expanded MLA, index_add vs
per-slot sum); the observed differences are a few 1e-7. A wrong layout, activation or routing rule
moves outputs by 1e-2 or more. Routing is compared only where the top-k choice is decisive (margin
checked below), so fp32 noise cannot flip an expert.

The vocabulary is cut to 1024 rows: the toy's 129280-row embedding and head would only cost time.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

pytest.importorskip("transformers")

from reference import adapters  # noqa: E402  (tests/ is on sys.path, as for golden_utils)

from dsvl2.config import PRESETS, DSVL2Config  # noqa: E402
from dsvl2.model.init import FIXTURE_INIT, init_params_  # noqa: E402
from dsvl2.model.moe import Router  # noqa: E402
from dsvl2.model.vlm import DSVL2  # noqa: E402

TOL = dict(atol=1e-5, rtol=1e-4)
VOCAB = 1024
ROUTER_GAIN = 4.0  # router logits ~ N(0, 4^2): decisive top-k, not a near-uniform softmax
MIN_MARGIN = 1e-4  # smallest gap allowed between the k-th and (k+1)-th routing score

MHA_FIELDS = dict(use_mla=False, kv_lora_rank=None, qk_nope_head_dim=0, qk_rope_head_dim=0, v_head_dim=0)
BASE_FIELDS = dict(topk_method="noaux_tc", scoring_func="sigmoid", norm_topk_prob=True, routed_scaling_factor=2.0)


# ---- building ----------------------------------------------------------------------------------------
def config(image_size: int | None = None, **language) -> DSVL2Config:
    toy = PRESETS["toy"]
    lang = dataclasses.replace(toy.language_config, vocab_size=VOCAB, **language)
    cfg = dataclasses.replace(toy, language_config=lang)
    if image_size is not None:
        vision = dataclasses.replace(toy.vision_config, image_size=image_size)
        cfg = dataclasses.replace(cfg, vision_config=vision, candidate_resolutions=((image_size, image_size),))
    return cfg


def build(cfg: DSVL2Config, seed: int = 0) -> DSVL2:
    torch.manual_seed(seed)
    # Non-trivial weights: the fixture recipe (N(0, 1/fan_in) matrices, q/k x2, norms 1 + N(0, 0.1), biased
    # noaux), with decisive routers.
    return init_params_(DSVL2(cfg), seed, **FIXTURE_INIT, router_gain=ROUTER_GAIN).float().eval()


def causal(batch: int, t: int) -> torch.Tensor:
    """Additive (B, 1, T, T) causal mask, built here independently of dsvl2.model.llm.causal_mask."""
    m = torch.full((t, t), torch.finfo(torch.float32).min).triu(1)
    return m.expand(batch, 1, t, t).clone()


def offset_positions(batch: int, t: int) -> torch.Tensor:
    """(B, T): one row from 0, one far along (large angles exercise the inverse frequencies)."""
    starts = torch.tensor([0, 3000])[:batch]
    return starts[:, None] + torch.arange(t)[None, :]


def routing_margin(router: Router, x: torch.Tensor) -> float:
    """Smallest gap between the k-th and (k+1)-th selection score over the tokens of x (N, D)."""
    logits = x.float() @ router.weight.float().T
    if router.noaux:
        choice = logits.sigmoid() + router.e_score_correction_bias.float()
    else:
        choice = logits.softmax(-1)
    top = choice.topk(router.top_k + 1, dim=-1).values
    return float((top[:, -2] - top[:, -1]).min())


def record_router_inputs(model: DSVL2) -> list[tuple[Router, torch.Tensor]]:
    seen: list[tuple[Router, torch.Tensor]] = []
    for m in model.modules():
        if isinstance(m, Router):
            m.register_forward_pre_hook(lambda mod, args: seen.append((mod, args[0].detach())))
    return seen


# ---- vision tower --------------------------------------------------------------------------------------
@pytest.mark.parametrize("image_size", [98, 104])  # 7*14 exactly, and 7*14 + 6 (last 6 pixels dropped)
@torch.no_grad()
def test_vision_tower_matches_siglip(image_size):
    model = build(config(image_size=image_size))
    ref = adapters.siglip_vision_model(model)
    tiles = torch.rand(3, 3, image_size, image_size, generator=torch.Generator().manual_seed(1)) * 2 - 1
    ours = model.vision(tiles)
    theirs = ref(pixel_values=tiles, interpolate_pos_encoding=False).last_hidden_state
    assert ours.shape == (3, 49, model.cfg.vision_config.width)
    torch.testing.assert_close(ours, theirs, **TOL)


# ---- Tiny: MHA and greedy MoE ---------------------------------------------------------------------------
@torch.no_grad()
def test_mha_matches_llama_attention():
    model = build(config(**MHA_FIELDS))
    ref, rotary = adapters.llama_attention(model, layer=0)
    b, t, d = 2, 9, model.cfg.language_config.hidden_size
    x = torch.randn(b, t, d, generator=torch.Generator().manual_seed(1))
    pos, mask = offset_positions(b, t), causal(b, t)
    cos, sin = model.language.model.rotary(pos, torch.float32)
    ours = model.language.model.layers[0].self_attn(x, cos, sin, mask)
    theirs = ref(x, position_embeddings=rotary(x, pos), attention_mask=mask)[0]
    torch.testing.assert_close(ours, theirs, **TOL)


@pytest.mark.parametrize("scaling", [1.0, 2.0])
@torch.no_grad()
def test_greedy_moe_matches_deepseek_v2_moe(scaling):
    model = build(config(**MHA_FIELDS, routed_scaling_factor=scaling))
    moe = model.language.model.layers[1].mlp
    ref = adapters.deepseek_v2_moe(model, layer=1)
    x = torch.randn(2, 16, model.cfg.language_config.hidden_size, generator=torch.Generator().manual_seed(1))
    assert routing_margin(moe.gate, x.view(-1, x.shape[-1])) > MIN_MARGIN
    torch.testing.assert_close(moe(x), ref(x), **TOL)


# ---- Small and Base: MLA -----------------------------------------------------------------------------------
@pytest.mark.parametrize("flavour", ["small", "base"])
@torch.no_grad()
def test_mla_absorbed_expanded_and_reference_agree(flavour):
    if flavour == "small":
        model = build(config())
        ref, rotary = adapters.deepseek_v2_attention(model, layer=0)
    else:
        model = build(config(**BASE_FIELDS))
        ref, rotary = adapters.deepseek_v3_attention(model, layer=0)
    attn = model.language.model.layers[0].self_attn
    b, t, d = 2, 9, model.cfg.language_config.hidden_size
    x = torch.randn(b, t, d, generator=torch.Generator().manual_seed(1))
    pos, mask = offset_positions(b, t), causal(b, t)
    cos, sin = model.language.model.rotary(pos, torch.float32)
    absorbed = attn(x, cos, sin, mask)
    expanded = attn.forward_expanded(x, cos, sin, mask)
    theirs = ref(hidden_states=x, position_embeddings=rotary(x, pos), attention_mask=mask)[0]
    torch.testing.assert_close(absorbed, expanded, **TOL)
    torch.testing.assert_close(absorbed, theirs, **TOL)
    torch.testing.assert_close(expanded, theirs, **TOL)


# ---- Base: noaux_tc MoE ------------------------------------------------------------------------------------
@torch.no_grad()
def test_noaux_tc_moe_matches_deepseek_v3_moe():
    model = build(config(**BASE_FIELDS))
    moe = model.language.model.layers[1].mlp
    ref = adapters.deepseek_v3_moe(model, layer=1)
    x = torch.randn(2, 16, model.cfg.language_config.hidden_size, generator=torch.Generator().manual_seed(1))
    flat = x.view(-1, x.shape[-1])
    assert routing_margin(moe.gate, flat) > MIN_MARGIN
    # The correction bias must matter, or "it selects but does not weight" would go unchecked.
    scores = (flat @ moe.gate.weight.T).sigmoid()
    k = moe.gate.top_k
    unbiased = scores.topk(k).indices.sort().values
    biased = (scores + moe.gate.e_score_correction_bias).topk(k).indices.sort().values
    assert (unbiased != biased).any(dim=-1).sum() >= 3
    torch.testing.assert_close(moe(x), ref(x), **TOL)


# ---- whole language models ----------------------------------------------------------------------------------
@pytest.mark.parametrize("expanded", [False, True], ids=["absorbed", "expanded"])
@pytest.mark.parametrize("flavour", ["small", "base"])
@torch.no_grad()
def test_language_model_logits_match_reference(flavour, expanded):
    model = build(config(**({} if flavour == "small" else BASE_FIELDS)))
    ref = adapters.deepseek_v2_causal_lm(model) if flavour == "small" else adapters.deepseek_v3_causal_lm(model)
    b, t = 2, 12
    ids = torch.randint(0, VOCAB, (b, t), generator=torch.Generator().manual_seed(1))
    attention_mask = torch.ones(b, t, dtype=torch.long)
    attention_mask[1, :3] = 0  # left padding: positions come from the mask on both sides
    positions = (attention_mask.cumsum(-1) - 1).masked_fill(attention_mask == 0, 1)
    routed = record_router_inputs(model)
    ours = model(ids, attention_mask=attention_mask.bool(), expanded=expanded)
    theirs = ref(input_ids=ids, attention_mask=attention_mask, position_ids=positions).logits
    real = attention_mask.bool()
    assert routed and all(routing_margin(r, x[real.view(-1)]) > MIN_MARGIN for r, x in routed)
    assert ours.shape == (b, t, VOCAB)
    torch.testing.assert_close(ours[real], theirs[real], **TOL)
