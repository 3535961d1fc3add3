"""transformers modules holding a dsvl2 model's weights: the independent references of the parity tests.

This is the ONLY place that knows transformers' module and key layouts (STYLE "Tests", item 1). The
layout here is that of transformers 4.x (routed experts are a ``ModuleList`` of per-expert MLPs;
5.x stores them differently), which is why the ``test`` extra pins ``<5``. In 4.x the official
``language.*`` keys, per-expert ``experts.{j}.*_proj.weight`` included, are transformers' keys once
the prefix is stripped; only the vision tower needs renaming (and its fused ``qkv`` split).

Weights leave our model through ``dsvl2.checkpoint.iter_official_tensors``, i.e. in the official
checkpoint layout (experts unstacked, ``view_seperator`` spelling), and are mapped from there, so the
export is exercised too. Every official key under the prefix an adapter consumes must be mapped
(nothing is dropped silently) and every reference module is loaded with ``strict=True``. Attention
runs with the ``eager`` implementation, the one the official DeepSeek code uses.

Caveats of transformers 4.57 that shape what can be compared (each one checked by the config
builders below, so a config the reference cannot express fails loudly instead of comparing wrongly):

- ``DeepseekV2MoEGate`` multiplies by ``routed_scaling_factor`` but ignores ``norm_topk_prob`` and
  has no ``scoring_func``: it can only reference softmax routing without renormalisation (Tiny, Small).
- ``DeepseekV2`` applies RoPE as a complex product on consecutive pairs and leaves the result
  interleaved; DeepSeek (and dsvl2) de-interleave first and keep ``[evens | odds]``. The rotation is
  the same, and q/k share the permutation, so scores and outputs agree (not the rotated q/k).
- ``DeepseekV3`` with ``rope_interleave=True`` de-interleaves exactly as DeepSeek does.
- ``DeepseekV3TopkRouter`` renormalises whenever ``norm_topk_prob`` is set, even for top-1; the
  official gate (and dsvl2) only for top-k > 1. Its correction bias is a buffer, not a parameter.
- Both decoders put an MoE in every layer ``>= first_k_dense_replace`` (no ``moe_layer_freq``), and
  both MoE blocks call ``shared_experts`` unconditionally (``n_shared_experts`` must be set).
- ``LlamaAttention`` multiplies scores by ``head_dim ** -0.5``; transformers 4.38.2 (Tiny's official
  code) divided by ``sqrt(head_dim)``: equal up to one rounding, visible in bf16 only.
- ``SiglipVisionModel`` has separate q/k/v projections; the official ViT fuses them in ``qkv``.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import DeepseekV2Config, DeepseekV3Config, LlamaConfig, SiglipVisionConfig
from transformers.models.deepseek_v2.modeling_deepseek_v2 import (
    DeepseekV2Attention,
    DeepseekV2ForCausalLM,
    DeepseekV2MoE,
    DeepseekV2RotaryEmbedding,
)
from transformers.models.deepseek_v3.modeling_deepseek_v3 import (
    DeepseekV3Attention,
    DeepseekV3ForCausalLM,
    DeepseekV3MoE,
    DeepseekV3RotaryEmbedding,
)
from transformers.models.llama.modeling_llama import LlamaAttention, LlamaRotaryEmbedding
from transformers.models.siglip.modeling_siglip import SiglipVisionModel

from dsvl2.checkpoint import iter_official_tensors
from dsvl2.config import LanguageConfig, VisionConfig

ATTN = "eager"


def official_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Our model's weights under the official checkpoint keys (our own export, ``checkpoint.py``)."""
    return dict(iter_official_tensors(model))


def _under(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Entries below ``prefix``, prefix stripped."""
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def _load(module: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    module.load_state_dict({k: v.clone() for k, v in state.items()}, strict=True)
    return module.float().eval()


def _check(cond: bool, what: str) -> None:
    if not cond:
        raise ValueError(f"transformers reference cannot express this config: {what}")


# ---- SigLIP vision tower ---------------------------------------------------------------------------
def siglip_vision_config(cfg: VisionConfig) -> SiglipVisionConfig:
    return SiglipVisionConfig(
        hidden_size=cfg.width, intermediate_size=cfg.mlp_dim, num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads, num_channels=3, image_size=cfg.image_size, patch_size=cfg.patch_size,
        hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6, attention_dropout=0.0,
        vision_use_head=False, attn_implementation=ATTN,
    )


def _siglip_key(key: str, width: int, value: torch.Tensor) -> dict[str, torch.Tensor]:
    """One official ``vision.*`` key (prefix stripped) -> SiglipVisionModel key(s)."""
    p = "vision_model."
    if key.startswith("patch_embed.proj."):
        return {p + "embeddings.patch_embedding." + key.rsplit(".", 1)[1]: value}
    if key == "pos_embed":
        return {p + "embeddings.position_embedding.weight": value[0]}  # (1, N, C) -> (N, C)
    if key.startswith("norm."):
        return {p + "post_layernorm." + key[len("norm."):]: value}
    parts = key.split(".")
    if parts[0] != "blocks":
        raise KeyError(f"vision.{key}: no SiglipVisionModel counterpart")
    layer = f"{p}encoder.layers.{parts[1]}."
    rest = ".".join(parts[2:])
    if rest.startswith("attn.qkv."):
        kind = parts[-1]  # weight (3C, C) or bias (3C,): q rows, then k, then v
        q, k, v = value.split(width, dim=0)
        return {f"{layer}self_attn.{n}_proj.{kind}": t for n, t in (("q", q), ("k", k), ("v", v))}
    simple = {"attn.proj.": "self_attn.out_proj.", "norm1.": "layer_norm1.", "norm2.": "layer_norm2.",
              "mlp.fc1.": "mlp.fc1.", "mlp.fc2.": "mlp.fc2."}
    for ours, theirs in simple.items():
        if rest.startswith(ours):
            return {layer + theirs + rest[len(ours):]: value}
    raise KeyError(f"vision.{key}: no SiglipVisionModel counterpart")


def siglip_vision_model(model: nn.Module) -> SiglipVisionModel:
    """``SiglipVisionModel`` (no pooling head) with ``model.vision``'s weights; compare ``last_hidden_state``."""
    cfg: VisionConfig = model.cfg.vision_config
    state = {}
    for key, value in _under(official_state(model), "vision.").items():
        if key.startswith("attn_pool."):  # the pooling head DeepSeek-VL2 never runs
            continue
        state.update(_siglip_key(key, cfg.width, value))
    return _load(SiglipVisionModel(siglip_vision_config(cfg)), state)


# ---- Tiny: LlamaAttention ---------------------------------------------------------------------------
def llama_config(lang: LanguageConfig) -> LlamaConfig:
    _check(not lang.use_mla, "LlamaAttention is plain multi-head attention (use_mla=False)")
    return LlamaConfig(
        vocab_size=lang.vocab_size, hidden_size=lang.hidden_size, intermediate_size=lang.intermediate_size,
        num_hidden_layers=lang.num_hidden_layers, num_attention_heads=lang.num_attention_heads,
        num_key_value_heads=lang.num_key_value_heads, head_dim=lang.head_dim, rope_theta=lang.rope_theta,
        max_position_embeddings=lang.max_position_embeddings, rms_norm_eps=lang.rms_norm_eps,
        attention_bias=False, attention_dropout=0.0, attn_implementation=ATTN,
    )


def llama_attention(model: nn.Module, layer: int) -> tuple[LlamaAttention, LlamaRotaryEmbedding]:
    """Layer ``layer``'s attention as ``LlamaAttention`` + its rotary module (positions -> cos, sin)."""
    config = llama_config(model.cfg.language_config)
    state = _under(official_state(model), f"language.model.layers.{layer}.self_attn.")
    return _load(LlamaAttention(config, layer), state), LlamaRotaryEmbedding(config)


# ---- DeepSeek config fields (V2 and V3 name them alike) -------------------------------------------
def _moe_fields(lang: LanguageConfig) -> dict:
    """What transformers' MoE blocks read; attention fields keep their defaults (unused there)."""
    _check(lang.moe_layer_freq == 1, "moe_layer_freq must be 1 (transformers has no such field)")
    _check(lang.n_routed_experts is not None and bool(lang.n_shared_experts),
           "routed and shared experts are required by transformers' MoE blocks")
    return dict(
        hidden_size=lang.hidden_size, intermediate_size=lang.intermediate_size,
        moe_intermediate_size=lang.moe_intermediate_size, n_shared_experts=lang.n_shared_experts,
        n_routed_experts=lang.n_routed_experts, routed_scaling_factor=lang.routed_scaling_factor,
        n_group=lang.n_group, topk_group=lang.topk_group, num_experts_per_tok=lang.num_experts_per_tok,
        norm_topk_prob=lang.norm_topk_prob, hidden_act=lang.hidden_act, attn_implementation=ATTN,
    )


def _model_fields(lang: LanguageConfig) -> dict:
    """Everything else a whole DeepSeek decoder needs (MLA sizes, RoPE, norms, vocabulary)."""
    _check(lang.use_mla, "transformers' DeepSeek attention is MLA (use_mla=True)")
    return dict(
        _moe_fields(lang), vocab_size=lang.vocab_size, num_hidden_layers=lang.num_hidden_layers,
        num_attention_heads=lang.num_attention_heads, num_key_value_heads=lang.num_key_value_heads,
        kv_lora_rank=lang.kv_lora_rank, q_lora_rank=lang.q_lora_rank, qk_rope_head_dim=lang.qk_rope_head_dim,
        v_head_dim=lang.v_head_dim, qk_nope_head_dim=lang.qk_nope_head_dim,
        first_k_dense_replace=lang.first_k_dense_replace, max_position_embeddings=lang.max_position_embeddings,
        rms_norm_eps=lang.rms_norm_eps, rope_theta=lang.rope_theta, rope_scaling=lang.rope_scaling,
        attention_bias=lang.attention_bias, attention_dropout=0.0, tie_word_embeddings=lang.tie_word_embeddings,
    )


# ---- DeepSeek-V2 (softmax greedy routing, MLA with complex RoPE) ------------------------------------
def deepseek_v2_config(lang: LanguageConfig, moe_only: bool = False) -> DeepseekV2Config:
    _check(lang.topk_method == "greedy" and lang.scoring_func == "softmax",
           "DeepseekV2MoEGate is softmax routing (greedy)")
    _check(not lang.norm_topk_prob, "DeepseekV2MoEGate ignores norm_topk_prob: keep it False")
    fields = _moe_fields(lang) if moe_only else _model_fields(lang)
    return DeepseekV2Config(**fields, topk_method=lang.topk_method)


def deepseek_v2_moe(model: nn.Module, layer: int) -> DeepseekV2MoE:
    config = deepseek_v2_config(model.cfg.language_config, moe_only=True)
    state = _under(official_state(model), f"language.model.layers.{layer}.mlp.")
    return _load(DeepseekV2MoE(config), state)


def deepseek_v2_attention(model: nn.Module, layer: int) -> tuple[DeepseekV2Attention, DeepseekV2RotaryEmbedding]:
    """Layer ``layer``'s MLA + the rotary module (positions -> complex ``freqs_cis``)."""
    config = deepseek_v2_config(model.cfg.language_config)
    state = _under(official_state(model), f"language.model.layers.{layer}.self_attn.")
    return _load(DeepseekV2Attention(config, layer), state), DeepseekV2RotaryEmbedding(config)


def deepseek_v2_causal_lm(model: nn.Module) -> DeepseekV2ForCausalLM:
    """The whole language model: official ``language.*`` keys are transformers' keys, prefix stripped."""
    config = deepseek_v2_config(model.cfg.language_config)
    state = _under(official_state(model), "language.")
    return _load(DeepseekV2ForCausalLM(config), state)


# ---- DeepSeek-V3 (sigmoid noaux_tc routing, MLA with DeepSeek's de-interleaved RoPE) ----------------
def deepseek_v3_config(lang: LanguageConfig, moe_only: bool = False) -> DeepseekV3Config:
    _check(lang.topk_method == "noaux_tc" and lang.scoring_func == "sigmoid",
           "DeepseekV3TopkRouter is sigmoid noaux_tc routing")
    _check(not lang.norm_topk_prob or lang.num_experts_per_tok > 1,
           "DeepseekV3TopkRouter renormalises top-1 weights, the official gate does not")
    fields = _moe_fields(lang) if moe_only else _model_fields(lang)
    return DeepseekV3Config(**fields, rope_interleave=True)


def deepseek_v3_moe(model: nn.Module, layer: int) -> DeepseekV3MoE:
    config = deepseek_v3_config(model.cfg.language_config, moe_only=True)
    state = _under(official_state(model), f"language.model.layers.{layer}.mlp.")
    return _load(DeepseekV3MoE(config), state)


def deepseek_v3_attention(model: nn.Module, layer: int) -> tuple[DeepseekV3Attention, DeepseekV3RotaryEmbedding]:
    """Layer ``layer``'s MLA + the rotary module (positions -> cos, sin of ``[freqs, freqs]``)."""
    config = deepseek_v3_config(model.cfg.language_config)
    state = _under(official_state(model), f"language.model.layers.{layer}.self_attn.")
    return _load(DeepseekV3Attention(config, layer), state), DeepseekV3RotaryEmbedding(config)


def deepseek_v3_causal_lm(model: nn.Module) -> DeepseekV3ForCausalLM:
    config = deepseek_v3_config(model.cfg.language_config)
    state = _under(official_state(model), "language.")
    return _load(DeepseekV3ForCausalLM(config), state)
