"""Preallocated attention caches, written at explicit positions.

``LatentCache`` (MLA; Small/Base) keeps only what MLA needs per token and layer: the normalised
latent ``c`` (kv_lora_rank values) and the shared rotary key (qk_rope_head_dim values) — 576 values
for the released models, the minimum. ``KVCache`` (plain attention; Tiny) keeps post-RoPE keys and
values per head. Both are sized once for ``(batch, max_len)``; every sequence of a batch shares the
write position (batches are left-padded), so ``length`` is one integer.
"""

from __future__ import annotations

import torch

from ..config import LanguageConfig
from ..errors import InputError


class _Cache:
    def __init__(self, max_len: int):
        self.max_len = max_len
        self.length = 0

    def check_room(self, new_tokens: int) -> None:
        if self.length + new_tokens > self.max_len:
            raise InputError(
                f"cache full: {self.length} cached + {new_tokens} new tokens exceed its size {self.max_len}"
            )

    def advance(self, new_tokens: int) -> None:
        self.length += new_tokens

    def reset(self) -> None:
        self.length = 0


class LatentCache(_Cache):
    """Per layer: ``latent (B, max_len, kv_lora_rank)`` and ``rope_key (B, max_len, qk_rope_head_dim)``."""

    def __init__(self, cfg: LanguageConfig, batch: int, max_len: int, dtype: torch.dtype, device: torch.device | str):
        super().__init__(max_len)
        shape = (cfg.num_hidden_layers, batch, max_len)
        self.latent = torch.zeros(*shape, cfg.kv_lora_rank, dtype=dtype, device=device)
        self.rope_key = torch.zeros(*shape, cfg.qk_rope_head_dim, dtype=dtype, device=device)

    def update(self, layer: int, latent: torch.Tensor, rope_key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write (B, S, r) / (B, S, rope) at ``length``; return everything cached so far for this layer."""
        end = self.length + latent.shape[1]
        self.latent[layer, :, self.length:end] = latent
        self.rope_key[layer, :, self.length:end] = rope_key
        return self.latent[layer, :, :end], self.rope_key[layer, :, :end]

    @property
    def bytes_per_token(self) -> int:
        layers = self.latent.shape[0]
        return layers * (self.latent.shape[-1] + self.rope_key.shape[-1]) * self.latent.element_size()


class KVCache(_Cache):
    """Per layer: post-RoPE ``k`` and ``v`` of shape (B, H, max_len, D)."""

    def __init__(self, cfg: LanguageConfig, batch: int, max_len: int, dtype: torch.dtype, device: torch.device | str):
        super().__init__(max_len)
        shape = (cfg.num_hidden_layers, batch, cfg.num_attention_heads, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = self.length + k.shape[2]
        self.k[layer, :, :, self.length:end] = k
        self.v[layer, :, :, self.length:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    @property
    def bytes_per_token(self) -> int:
        layers, _, heads, _, dim = self.k.shape
        return layers * 2 * heads * dim * self.k.element_size()


def make_cache(cfg: LanguageConfig, batch: int, max_len: int, dtype: torch.dtype,
               device: torch.device | str) -> LatentCache | KVCache:
    """The right cache for the config: latent for MLA, per-head K/V for plain attention."""
    cls = LatentCache if cfg.use_mla else KVCache
    return cls(cfg, batch, max_len, dtype, device)
