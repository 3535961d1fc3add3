"""DeepSeekMoE decoder (DeepSeek's ``DeepseekV2Model`` / ``DeepseekV2ForCausalLM``, spec §7).

Pre-norm layers ``h + Attn(RMSNorm(h))``, ``h + FFN(RMSNorm(h))``; layer 0 (``first_k_dense_replace``)
is a dense SwiGLU, the others MoE. Masks and positions follow transformers 4.38.2: an additive mask
of ``finfo(dtype).min`` for future and padded keys, positions ``cumsum(attention_mask) - 1``.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import LanguageConfig
from .attention import MHA, MLA
from .cache import KVCache, LatentCache
from .layers import MLP, RMSNorm, RotaryTable, linear
from .moe import MoE
from .plan import EXACT, Plan


class DecoderLayer(nn.Module):
    def __init__(self, cfg: LanguageConfig, index: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = MLA(cfg, index) if cfg.use_mla else MHA(cfg, index)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MoE(cfg) if cfg.is_moe_layer(index) else MLP(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None,
                cache: LatentCache | KVCache | None, expanded: bool = False) -> torch.Tensor:
        x = self.input_layernorm(h)
        attn = self.self_attn.forward_expanded if expanded else self.self_attn
        h = h + attn(x, cos, sin, mask, cache)
        return h + self.mlp(self.post_attention_layernorm(h))


def causal_mask(attention_mask: torch.Tensor, past: int, new: int, dtype: torch.dtype,
                padded: bool | None = None) -> torch.Tensor | None:
    """Additive (B, 1, S, past+S) mask as transformers 4.38.2 builds it; None when nothing is masked.

    ``attention_mask`` (B, past+S) is True on real tokens. Masked entries are exactly ``finfo.min``.
    ``padded``: whether ``attention_mask`` has any False entry, when the caller knows (a decode loop
    decides it once); None reads it from the mask, a host sync and a graph break under torch.compile.
    """
    if new == 1:
        if padded is None:
            padded = not bool(attention_mask.all())
        if not padded:
            return None  # decode without padding: every key is visible, adding zeros changes nothing
    b, total = attention_mask.shape
    device = attention_mask.device
    q = torch.arange(past, past + new, device=device)[:, None]
    k = torch.arange(total, device=device)[None, :]
    blocked = (k > q)[None, None] | ~attention_mask[:, None, None, :].bool()  # (B, 1, S, T)
    return torch.zeros(blocked.shape, dtype=dtype, device=device).masked_fill(blocked, torch.finfo(dtype).min)


class LanguageModel(nn.Module):
    """``language.model``: embeddings, decoder layers, final norm."""

    def __init__(self, cfg: LanguageConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        if cfg.use_mla:
            self.rotary = RotaryTable(cfg.qk_rope_head_dim, cfg.rope_theta, cfg.max_position_embeddings, tabulated=True)
        else:
            self.rotary = RotaryTable(cfg.head_dim, cfg.rope_theta, cfg.max_position_embeddings, tabulated=False)
        self.gradient_checkpointing = False

    def forward(self, inputs_embeds: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor | None,
                cache: LatentCache | KVCache | None = None, expanded: bool = False) -> torch.Tensor:
        """inputs_embeds (B, S, D), positions (B, S), additive mask (B, 1, S, T) -> hidden (B, S, D)."""
        cos, sin = self.rotary(positions, inputs_embeds.dtype)  # (B, S, rope)
        h = inputs_embeds
        if cache is not None:
            cache.check_room(h.shape[1])
        for layer in self.layers:
            if self.gradient_checkpointing and self.training:
                h = torch.utils.checkpoint.checkpoint(layer, h, cos, sin, mask, cache, expanded, use_reentrant=False)
            else:
                h = layer(h, cos, sin, mask, cache, expanded)
        if cache is not None:
            cache.advance(h.shape[1])
        return self.norm(h)


class CausalLM(nn.Module):
    """``language``: the decoder plus the untied ``lm_head``."""

    plan: Plan = EXACT  # set per model by plan.apply

    def __init__(self, cfg: LanguageConfig):
        super().__init__()
        self.cfg = cfg
        self.model = LanguageModel(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """lm_head in the weights' dtype, then fp32 (as the official forward)."""
        return linear(hidden, self.lm_head, self.plan).float()
