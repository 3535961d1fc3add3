"""Self-attention of the language model: plain multi-head (Tiny) and Multi-head Latent Attention.

``MHA`` reproduces transformers 4.38.2 ``LlamaAttention`` as Tiny runs it (half-split RoPE, scores
divided by ``sqrt(head_dim)``; spec §7.4). ``MLA`` reproduces DeepSeek's ``DeepseekV2Attention`` in
its official *absorbed* form: the cache holds only the normalised latent and the shared rotary key,
``W_UK`` is folded into the query and ``W_UV`` applied after attending over latents (spec §7.3).
That is both the faithful form (bf16 parity depends on its rounding points, including the
heads-merged ``einsum``) and the fast decode form. ``MLA.forward_expanded`` is the textbook form —
keys and values decompressed per head, then SDPA — cheaper for long prefills and training; a test
holds the two equal.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..config import LanguageConfig
from . import cpu_kernels
from .plan import EXACT, Plan
from .cache import KVCache, LatentCache
from .layers import RMSNorm, apply_rope, apply_rope_interleaved
from .quant import linear


def cache_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``torch.matmul(a, b)`` in ``a``'s dtype, for products of one query row with the cache.

    On CPU, torch's bf16/fp16 batched matmul is slow when ``a`` has one row (decode: a new oneDNN
    primitive for every cache length, and a copy of the transposed keys): 4-5x slower than converting
    to fp32, multiplying and rounding once at ~1000 cached tokens. The products of bf16 numbers are
    exact in fp32 and both accumulate in fp32, only in a different order: the rounded results agree
    except for rare last-bit ties (none on the golden cases, whose bf16 parity stays bit-exact; a few
    per 10^4 values at Small's widths, held close by a test).
    """
    if one_cpu_query_row(a) and a.shape[0] == 1:  # batches: converting B per-head caches costs more
        return torch.matmul(a.float(), b.float()).to(a.dtype)
    return torch.matmul(a, b)


def one_cpu_query_row(a: torch.Tensor) -> bool:
    return a.device.type == "cpu" and a.dtype in (torch.bfloat16, torch.float16) and a.shape[-2] == 1


CPU_QUERY_BLOCK = 128  # query rows per pass of the reference attention on CPU (prefill)


def by_query_blocks(attend: Callable[[slice], torch.Tensor], q: torch.Tensor) -> torch.Tensor:
    """``attend(rows)`` for all query rows of ``q`` (B, H, S, .), in blocks of rows on CPU.

    The reference attention materialises (B, H, S, T) scores and runs four elementwise passes over
    them (scale, mask, fp32 softmax, rounding); for a 1,000-token prompt that is 40 MB per pass, out of
    cache. In blocks of 128 query rows each pass stays in cache: Tiny's attention at 1,036 tokens runs
    1.9x faster alone, the whole prefill ~8 % (medians, bench/fast_paths.py). Rows are independent, so
    the results are the same numbers (bit-identical, tested).
    """
    s = q.shape[-2]
    if q.device.type != "cpu" or s <= CPU_QUERY_BLOCK:
        return attend(slice(None))
    return torch.cat([attend(slice(i, i + CPU_QUERY_BLOCK)) for i in range(0, s, CPU_QUERY_BLOCK)], dim=-2)


def mask_rows(mask: torch.Tensor, rows: slice) -> torch.Tensor:
    """The additive mask's rows for a block of queries (a mask broadcast over the queries as is)."""
    return mask if mask.shape[-2] == 1 else mask[..., rows, :]


class MHA(nn.Module):
    plan: Plan = EXACT  # set per model by plan.apply

    def __init__(self, cfg: LanguageConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.heads = cfg.num_attention_heads
        self.head_dim = cfg.head_dim
        self.scale_div = cfg.head_dim ** 0.5  # math.sqrt: 4.38.2 divides by it
        d = cfg.hidden_size
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, d, bias=False)
        self.v_proj = nn.Linear(d, d, bias=False)
        self.o_proj = nn.Linear(d, d, bias=False)

    def _project(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache | None):
        """Post-RoPE q (B, H, S, D) and the keys/values attended over (cache included), (B, H, T, D)."""
        b, s, _ = x.shape
        q = linear(x, self.q_proj, self.plan).view(b, s, self.heads, self.head_dim).transpose(1, 2)  # (B, H, S, D)
        k = linear(x, self.k_proj, self.plan).view(b, s, self.heads, self.head_dim).transpose(1, 2)
        v = linear(x, self.v_proj, self.plan).view(b, s, self.heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)  # (B, H, T, D)
        return q, k, v

    def _kernel_step(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None,
                     cache: KVCache | None) -> torch.Tensor | None:
        """The whole batch-1 decode step in one C call (opt-in CPU kernels), or None where it does not apply.

        Attention is computed as SDPA computes it (fp32 scores and softmax), so under the kernels both
        forms agree with ``forward_expanded``: bf16-close, like the rest of the kernels.
        """
        if cache is None or mask is not None or not self.plan.kernels:
            return None
        return cpu_kernels.mha_decode(self, x, cos, sin, cache)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None,
                cache: KVCache | None = None) -> torch.Tensor:
        if (out := self._kernel_step(x, cos, sin, mask, cache)) is not None:
            return out
        b, s, _ = x.shape
        q, k, v = self._project(x, cos, sin, cache)
        kt = k.transpose(2, 3)

        def attend(rows: slice) -> torch.Tensor:
            scores = cache_matmul(q[:, :, rows], kt) / self.scale_div  # (B, H, s, T)
            if mask is not None:
                scores = scores + mask_rows(mask, rows)
            probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
            return cache_matmul(probs, v)  # (B, H, s, D)

        o = by_query_blocks(attend, q)  # (B, H, S, D)
        return linear(o.transpose(1, 2).reshape(b, s, self.heads * self.head_dim), self.o_proj, self.plan)

    def forward_expanded(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None,
                         cache: KVCache | None = None) -> torch.Tensor:
        """The fused form: SDPA (torch's flash kernel on CPU) instead of the reference's matmul-softmax-matmul.

        Keys and values are already per head, so there is nothing to decompress; this is the fast path
        the ``expanded`` flag selects for prefill and decode alike. It does not round the scores and
        probabilities to bf16 as the reference does: bf16-close, not bit-identical.
        """
        if (out := self._kernel_step(x, cos, sin, mask, cache)) is not None:
            return out
        b, s, _ = x.shape
        q, k, v = self._project(x, cos, sin, cache)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1 / self.scale_div)  # (B, H, S, D)
        return linear(o.transpose(1, 2).reshape(b, s, self.heads * self.head_dim), self.o_proj, self.plan)


class MLA(nn.Module):
    plan: Plan = EXACT  # set per model by plan.apply

    def __init__(self, cfg: LanguageConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.heads = cfg.num_attention_heads
        self.nope = cfg.qk_nope_head_dim
        self.rope = cfg.qk_rope_head_dim
        self.v_dim = cfg.v_head_dim
        self.rank = cfg.kv_lora_rank
        self.scale = cfg.softmax_scale
        d = cfg.hidden_size
        self.q_proj = nn.Linear(d, self.heads * cfg.q_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(d, self.rank + self.rope, bias=False)
        self.kv_a_layernorm = RMSNorm(self.rank)
        self.kv_b_proj = nn.Linear(self.rank, self.heads * (self.nope + self.v_dim), bias=False)
        self.o_proj = nn.Linear(self.heads * self.v_dim, d, bias=False)

    def _project(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        b, s, _ = x.shape
        q = linear(x, self.q_proj, self.plan).view(b, s, self.heads, self.nope + self.rope)
        q = q.transpose(1, 2)  # (B, H, S, 192)
        q_nope, q_pe = torch.split(q, [self.nope, self.rope], dim=-1)
        a = linear(x, self.kv_a_proj_with_mqa, self.plan)  # (B, S, r + rope)
        latent, k_pe = torch.split(a, [self.rank, self.rope], dim=-1)
        latent = self.kv_a_layernorm(latent)  # (B, S, r)
        k_pe = k_pe.view(b, s, 1, self.rope).transpose(1, 2)  # (B, 1, S, rope)
        q_pe = apply_rope_interleaved(q_pe, cos, sin)
        k_pe = apply_rope_interleaved(k_pe, cos, sin)
        return q_nope, q_pe, latent, k_pe

    def _kernel_step(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None,
                     cache: LatentCache | None) -> torch.Tensor | None:
        """The whole batch-1 decode step in one C call (opt-in CPU kernels), or None where it does not apply.

        The kernel follows this absorbed form's rounding points (bf16-close: its sums run in another
        order); under the kernels ``forward_expanded`` takes it too, like MHA's.
        """
        if cache is None or mask is not None or not self.plan.kernels:
            return None
        return cpu_kernels.mla_decode(self, x, cos, sin, cache)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None,
                cache: LatentCache | None = None) -> torch.Tensor:
        """Absorbed form (the official eager path): attend over latents, never expand K/V."""
        if (out := self._kernel_step(x, cos, sin, mask, cache)) is not None:
            return out
        b, s, _ = x.shape
        q_nope, q_pe, latent, k_pe = self._project(x, cos, sin)
        k_pe = k_pe.squeeze(1)  # (B, S, rope)
        if cache is not None:
            latent, k_pe = cache.update(self.layer, latent, k_pe)  # (B, T, r), (B, T, rope)
        w = self.kv_b_proj.weight.view(self.heads, self.nope + self.v_dim, self.rank)
        w_uk, w_uv = w[:, :self.nope], w[:, self.nope:]  # (H, nope, r), (H, v, r)
        q_lat = torch.matmul(q_nope, w_uk)  # (B, H, S, r)
        if one_cpu_query_row(q_lat):
            o_lat = self._attend_latents_fp32(q_lat, q_pe, latent, k_pe, mask)
        else:
            k_pe_t, latent_t = k_pe.unsqueeze(1).mT, latent.unsqueeze(-3).mT

            def attend(rows: slice) -> torch.Tensor:
                scores = (torch.matmul(q_pe[:, :, rows], k_pe_t)
                          + torch.matmul(q_lat[:, :, rows], latent_t)) * self.scale  # (B, H, s, T)
                if mask is not None:
                    scores = scores + mask_rows(mask, rows)
                probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(q_pe.dtype)
                # One (B, H*s, T) @ (B, T, r) matmul, heads merged into rows, as the official einsum
                # does: a per-head batched matmul rounds differently in bf16.
                return torch.einsum("bhql,blc->bhqc", probs, latent)  # (B, H, s, r)

            o_lat = by_query_blocks(attend, q_lat)  # (B, H, S, r)
        o = torch.matmul(o_lat, w_uv.mT)  # (B, H, S, v)
        return linear(o.transpose(1, 2).reshape(b, s, self.heads * self.v_dim), self.o_proj, self.plan)

    def _attend_latents_fp32(self, q_lat: torch.Tensor, q_pe: torch.Tensor, latent: torch.Tensor,
                             k_pe: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """The absorbed attention for one query row on CPU (decode), with the reference's rounding points.

        As in ``cache_matmul``, the products run in fp32 and are rounded to bf16 where the reference
        rounds, which gives the reference's numbers up to rare last-bit ties. The heads are merged into the rows of one
        (B, H, r) @ (B, r, T) product: broadcasting the shared latents over the heads, as the reference
        writes it, makes torch copy the whole cache once per head. The latents are converted once.
        """
        b, h, s, r = q_lat.shape
        dtype = q_lat.dtype
        lat = latent.float()  # (B, T, r)
        s_pe = torch.matmul(q_pe.float().reshape(b, h * s, -1), k_pe.float().mT).to(dtype)  # (B, H*S, T)
        s_lat = torch.matmul(q_lat.float().reshape(b, h * s, r), lat.mT).to(dtype)
        scores = ((s_pe + s_lat) * self.scale).view(b, h, s, -1)  # (B, H, S, T)
        if mask is not None:
            scores = scores + mask
        probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(dtype)
        return torch.matmul(probs.float().reshape(b, h * s, -1), lat).to(dtype).view(b, h, s, r)  # (B, H, S, r)

    def forward_expanded(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None,
                         cache: LatentCache | None = None) -> torch.Tensor:
        """Textbook form: decompress per-head keys/values from the latents, then SDPA.

        Same cache contents as the absorbed form (only latents are stored), so the two can be mixed:
        expanded prefill, absorbed decode. For one new token (decode) decompressing the whole cache would
        cost far more than attending over the latents, so decode takes the absorbed form (``forward``);
        SDPA over the latents (keys ``[c ; k_pe]`` of width 576) was measured 25x slower on CPU.
        """
        if x.shape[1] == 1:
            return self.forward(x, cos, sin, mask, cache)
        b, s, _ = x.shape
        q_nope, q_pe, latent, k_pe = self._project(x, cos, sin)
        k_pe = k_pe.squeeze(1)
        if cache is not None:
            latent, k_pe = cache.update(self.layer, latent, k_pe)
        t = latent.shape[1]
        kv = self.kv_b_proj(latent).view(b, t, self.heads, self.nope + self.v_dim).transpose(1, 2)  # (B, H, T, 256)
        k_nope, v = torch.split(kv, [self.nope, self.v_dim], dim=-1)
        k = torch.cat([k_nope, k_pe.unsqueeze(1).expand(b, self.heads, t, self.rope)], dim=-1)  # (B, H, T, 192)
        q = torch.cat([q_nope, q_pe], dim=-1)  # (B, H, S, 192)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale)  # (B, H, S, v)
        return linear(o.transpose(1, 2).reshape(b, s, self.heads * self.v_dim), self.o_proj, self.plan)
