"""DeepSeek-OCR 2's vision side ("deepencoderv2"): SAM ViT-B, then a Qwen2-shaped query encoder.

Reproduces the official ``deepencoderv2/sam_vary_sdpa.py`` (``ImageEncoderViT`` as
``build_sam_vit_b`` configures it) and ``deepencoderv2/qwen2_d2e.py`` (``Qwen2Decoder2Encoder``):

- SAM: 16-px patches, an absolute position table for the 1024-px grid (bicubic, antialiased resize
  to the 768-px tiles' grid), pre-norm blocks with decomposed relative positions; windows of 14 with
  zero padding except in the global layers (2, 5, 8, 11); exact GELU; a neck 1x1 conv -> LayerNorm2d
  -> 3x3 conv -> LayerNorm2d, then two 3x3 stride-2 convs (``net_2``, ``net_3``): a g x g patch grid
  becomes ceil(g/4)^2 vectors of the query encoder's width.
- Query encoder: those vectors followed by as many learned queries (``query_1024`` for the global
  view, ``query_768`` for tiles), through Qwen2 decoder layers (GQA with q/k/v biases, RoPE over
  positions 0..2N-1, SwiGLU, RMSNorm) under a mask that is bidirectional over the image vectors and
  causal over the queries (queries see every image vector; image vectors never see queries); the
  final norm, and only the query outputs are kept.

Attribute names follow the checkpoint keys; ``checkpoint.py`` maps the official nesting
(``qwen2_model.model.model.layers``) onto ``qwen2_model.layers``. The SAM global attention at the
64x64 grid holds a (heads, 4096, 4096) score and bias tensor: on CPU it runs in blocks of query rows
(the same numbers, bounded memory).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config_ocr2 import OCR2VisionConfig, QueryEncoderConfig, SamConfig
from ..errors import InputError
from .layers import MLP, RMSNorm, RotaryTable, apply_rope

SAM_QUERY_BLOCK = 1024  # query rows per SDPA call in SAM attention (bounds the bias tensor)


def resize_rel_pos(rel_pos: torch.Tensor, length: int) -> torch.Tensor:
    """A (L, D) relative-position table linearly resized to ``length`` rows (as the official, in fp32)."""
    if rel_pos.shape[0] == length:
        return rel_pos
    x = rel_pos.float().T.unsqueeze(0)  # (1, D, L)
    return F.interpolate(x, size=length, mode="linear").squeeze(0).T.to(rel_pos.dtype)


def rel_pos_table(size: int, rel_pos: torch.Tensor) -> torch.Tensor:
    """(size, size, D): the embedding of offset ``q - k`` for every query/key coordinate pair."""
    table = resize_rel_pos(rel_pos, 2 * size - 1)
    idx = torch.arange(size, device=rel_pos.device)
    return table[idx[:, None] - idx[None, :] + size - 1]


class SamAttention(nn.Module):
    def __init__(self, cfg: SamConfig, size: int):
        super().__init__()
        self.heads = cfg.heads
        self.qkv = nn.Linear(cfg.width, 3 * cfg.width)
        self.proj = nn.Linear(cfg.width, cfg.width)
        self.rel_pos_h = nn.Parameter(torch.zeros(2 * size - 1, cfg.head_dim))
        self.rel_pos_w = nn.Parameter(torch.zeros(2 * size - 1, cfg.head_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, c = x.shape
        qkv = self.qkv(x).reshape(b, h * w, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B, H, T, D)
        rh = rel_pos_table(h, self.rel_pos_h)  # (h, h, D)
        rw = rel_pos_table(w, self.rel_pos_w)  # (w, w, D)
        rq = q.reshape(b, self.heads, h, w, -1)
        bias_h = torch.einsum("bnhwc,hkc->bnhwk", rq, rh)  # (B, H, h, w, kh)
        bias_w = torch.einsum("bnhwc,wkc->bnhwk", rq, rw)  # (B, H, h, w, kw)
        bias_h = bias_h.reshape(b, self.heads, h * w, h, 1)
        bias_w = bias_w.reshape(b, self.heads, h * w, 1, w)
        t = h * w
        step = SAM_QUERY_BLOCK if x.device.type == "cpu" else t
        outs = []
        for s in range(0, t, step):
            rows = slice(s, min(s + step, t))
            bias = (bias_h[:, :, rows] + bias_w[:, :, rows]).reshape(b, self.heads, -1, t)  # (B, H, rows, T)
            outs.append(F.scaled_dot_product_attention(q[:, :, rows], k, v, attn_mask=bias))
        o = torch.cat(outs, dim=2)  # (B, H, T, D)
        return self.proj(o.transpose(1, 2).reshape(b, h, w, c))


class SamMlp(nn.Module):
    def __init__(self, cfg: SamConfig):
        super().__init__()
        self.lin1 = nn.Linear(cfg.width, cfg.mlp_dim)
        self.lin2 = nn.Linear(cfg.mlp_dim, cfg.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin2(F.gelu(self.lin1(x)))


def window_partition(x: torch.Tensor, size: int) -> torch.Tensor:
    """(B, H, W, C) -> (B * nh * nw, size, size, C), zero-padded at the bottom/right to whole windows."""
    b, h, w, c = x.shape
    x = F.pad(x, (0, 0, 0, (-w) % size, 0, (-h) % size))
    nh, nw = x.shape[1] // size, x.shape[2] // size
    x = x.view(b, nh, size, nw, size, c).permute(0, 1, 3, 2, 4, 5)  # (B, nh, nw, size, size, C)
    return x.reshape(-1, size, size, c)


def window_unpartition(windows: torch.Tensor, size: int, h: int, w: int) -> torch.Tensor:
    nh, nw = -(-h // size), -(-w // size)
    c = windows.shape[-1]
    x = windows.view(-1, nh, nw, size, size, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, nh * size, nw * size, c)
    return x[:, :h, :w]


class SamBlock(nn.Module):
    def __init__(self, cfg: SamConfig, window: int, grid: int):
        super().__init__()
        self.window = window  # 0: global attention over the whole grid
        self.norm1 = nn.LayerNorm(cfg.width, eps=1e-6)
        self.attn = SamAttention(cfg, window or grid)
        self.norm2 = nn.LayerNorm(cfg.width, eps=1e-6)
        self.mlp = SamMlp(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm1(x)
        if self.window:
            h, w = y.shape[1:3]
            y = window_unpartition(self.attn(window_partition(y, self.window)), self.window, h, w)
        else:
            y = self.attn(y)
        x = x + y
        return x + self.mlp(self.norm2(x))


class LayerNorm2d(nn.Module):
    """LayerNorm over the channels of a (B, C, H, W) map."""

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.layer_norm(x.permute(0, 2, 3, 1), (x.shape[1],), self.weight, self.bias, self.eps)
        return y.permute(0, 3, 1, 2)


class PatchEmbed(nn.Module):
    def __init__(self, cfg: SamConfig):
        super().__init__()
        self.proj = nn.Conv2d(3, cfg.width, kernel_size=cfg.patch_size, stride=cfg.patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).permute(0, 2, 3, 1)  # (B, g, g, C)


class SamEncoder(nn.Module):
    """pixels (N, 3, S, S) -> (N, dim, ceil(g/4), ceil(g/4)), g = S / patch."""

    def __init__(self, cfg: SamConfig, image_size: int, out_dim: int):
        super().__init__()
        grid = image_size // cfg.patch_size
        self.patch_embed = PatchEmbed(cfg)
        self.pos_embed = nn.Parameter(torch.zeros(1, grid, grid, cfg.width))
        self.blocks = nn.ModuleList(
            SamBlock(cfg, 0 if i in cfg.global_attn_indexes else cfg.window_size, grid) for i in range(cfg.layers))
        n = cfg.neck_channels
        self.neck = nn.Sequential(nn.Conv2d(cfg.width, n, 1, bias=False), LayerNorm2d(n),
                                  nn.Conv2d(n, n, 3, padding=1, bias=False), LayerNorm2d(n))
        mid = cfg.downsample_channels[0]
        self.net_2 = nn.Conv2d(n, mid, 3, stride=2, padding=1, bias=False)
        self.net_3 = nn.Conv2d(mid, out_dim, 3, stride=2, padding=1, bias=False)

    def position_table(self, grid: int) -> torch.Tensor:
        """The position table at ``grid`` x ``grid`` (bicubic with antialias in fp32, as the official)."""
        pos = self.pos_embed
        if pos.shape[1] == grid:
            return pos
        resized = F.interpolate(pos.permute(0, 3, 1, 2).float(), size=(grid, grid), mode="bicubic",
                                antialias=True, align_corners=False)
        return resized.to(pos.dtype).permute(0, 2, 3, 1)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(pixels)
        x = x + self.position_table(x.shape[1])
        for block in self.blocks:
            x = block(x)
        x = self.neck(x.permute(0, 3, 1, 2))
        return self.net_3(self.net_2(x))


class EncoderAttention(nn.Module):
    """Qwen2 grouped-query attention with biased q/k/v projections, over an explicit boolean mask."""

    def __init__(self, cfg: QueryEncoderConfig):
        super().__init__()
        d, hd = cfg.dim, cfg.head_dim
        self.heads, self.kv_heads, self.head_dim = cfg.heads, cfg.kv_heads, hd
        self.q_proj = nn.Linear(d, cfg.heads * hd)
        self.k_proj = nn.Linear(d, cfg.kv_heads * hd)
        self.v_proj = nn.Linear(d, cfg.kv_heads * hd)
        self.o_proj = nn.Linear(cfg.heads * hd, d, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = self.k_proj(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        v = self.v_proj(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        rep = self.heads // self.kv_heads
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)  # (B, H, T, D)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
        return self.o_proj(o.transpose(1, 2).reshape(b, t, -1))


class EncoderLayer(nn.Module):
    def __init__(self, cfg: QueryEncoderConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.dim, cfg.rms_norm_eps)
        self.self_attn = EncoderAttention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.rms_norm_eps)
        self.mlp = MLP(cfg.dim, cfg.intermediate_size)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, allowed)
        return x + self.mlp(self.post_attention_layernorm(x))


def query_mask(n_image: int, n_query: int, device: torch.device) -> torch.Tensor:
    """(T, T) bool, True where attending is allowed: any image key, or an earlier-or-same position.

    Image rows see exactly the image keys (a key at or before an image row is an image key); query rows
    see every image key and the queries up to themselves.
    """
    t = n_image + n_query
    q = torch.arange(t, device=device)[:, None]
    k = torch.arange(t, device=device)[None, :]
    return (k < n_image) | (k <= q)


class QueryEncoder(nn.Module):
    """image vectors (N, n, dim) -> query outputs (N, n, dim); n selects ``query_1024`` or ``query_768``."""

    def __init__(self, cfg: QueryEncoderConfig, global_queries: int, local_queries: int):
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.layers))
        self.norm = RMSNorm(cfg.dim, cfg.rms_norm_eps)
        self.query_1024 = nn.Embedding(global_queries, cfg.dim)  # the global view's queries
        self.query_768 = nn.Embedding(local_queries, cfg.dim)  # a local tile's queries
        self.rotary = RotaryTable(cfg.head_dim, cfg.rope_theta, 2 * max(global_queries, local_queries),
                                  tabulated=False)

    def forward(self, x: torch.Tensor, is_global: bool) -> torch.Tensor:
        queries = (self.query_1024 if is_global else self.query_768).weight
        n, t, d = x.shape
        if queries.shape[0] != t:
            raise InputError(f"query encoder: {t} image vectors but {queries.shape[0]} "
                             f"{'global' if is_global else 'tile'} queries (wrong view size?)")
        h = torch.cat([x, queries.to(x.dtype).unsqueeze(0).expand(n, -1, -1)], dim=1)  # (N, 2n, dim)
        positions = torch.arange(2 * t, device=x.device).unsqueeze(0)
        cos, sin = self.rotary(positions, h.dtype)
        allowed = query_mask(t, t, x.device)
        for layer in self.layers:
            h = layer(h, cos, sin, allowed)
        return self.norm(h)[:, t:]


def build_encoders(cfg: OCR2VisionConfig) -> tuple[SamEncoder, QueryEncoder]:
    """The two encoders of ``vision_config``: SAM for both view sizes, one query encoder."""
    sam = SamEncoder(cfg.sam, cfg.image_size, cfg.encoder.dim)
    return sam, QueryEncoder(cfg.encoder, cfg.global_queries, cfg.local_queries)
