"""Parameter counts and memory estimates computed from a config alone (no weights needed).

"Activated" parameters follow the model card's convention (Tiny 1.0B / Small 2.8B / Base 4.5B):
everything one token's forward pass multiplies with — the vision tower, projector, attention,
dense and shared FFNs, ``num_experts_per_tok`` routed experts per MoE layer, routers and the
``lm_head`` — but not the token-embedding table (a lookup reads one row) nor the unused SigLIP
pooling head.
"""

from __future__ import annotations

from dataclasses import dataclass

from .config import DSVL2Config
from .config_ocr2 import OCR2Config


@dataclass(frozen=True)
class ParamCounts:
    vision: int
    vision_unused_pool: int
    projector: int
    embed: int
    lm_head: int
    attention: int
    dense_ffn: int
    shared_experts: int
    routed_experts: int
    routers: int
    norms: int
    activated_routed: int

    @property
    def total(self) -> int:
        return (self.vision + self.vision_unused_pool + self.projector + self.embed + self.lm_head + self.attention
                + self.dense_ffn + self.shared_experts + self.routed_experts + self.routers + self.norms)

    @property
    def activated(self) -> int:
        return (self.vision + self.projector + self.lm_head + self.attention + self.dense_ffn + self.shared_experts
                + self.activated_routed + self.routers + self.norms)

    @property
    def decode_read(self) -> int:
        """Parameters read per generated token (no vision work in decode; one embedding row)."""
        return self.activated - self.vision - self.projector


def _ocr2_vision(cfg: OCR2Config) -> tuple[int, int]:
    """(vision, projector + view separator) parameters of DeepSeek-OCR 2, from the model built on ``meta``."""
    import torch

    from .model.ocr2_vision import build_encoders

    with torch.device("meta"):
        sam, enc = build_encoders(cfg.vision_config)
    p = cfg.projector_config
    vision = sum(t.numel() for m in (sam, enc) for t in m.parameters())
    return vision, p.input_dim * p.n_embed + 2 * p.n_embed


def count_parameters(cfg: DSVL2Config | OCR2Config) -> ParamCounts:
    lc = cfg.language_config
    if isinstance(cfg, OCR2Config):
        (vision, projector), pool = _ocr2_vision(cfg), 0
    else:
        v, p = cfg.vision_config, cfg.projector_config
        w, m = v.width, v.mlp_dim
        block = 2 * 2 * w + (3 * w * w + 3 * w) + (w * w + w) + (w * m + m) + (m * w + w)
        vision = 3 * w * v.patch_size ** 2 + w + v.num_patches * w + v.layers * block + 2 * w
        pool = w + (w * w + w) + (2 * w * w + 2 * w) + (w * w + w) + 2 * w + (w * m + m) + (m * w + w)
        merged = p.input_dim * p.downsample_ratio ** 2
        projector = merged * p.n_embed + p.n_embed + p.n_embed * p.n_embed + p.n_embed + 2 * p.n_embed
    d, layers = lc.hidden_size, lc.num_hidden_layers
    if lc.use_mla:
        h = lc.num_attention_heads
        attn = (d * h * lc.q_head_dim + d * (lc.kv_lora_rank + lc.qk_rope_head_dim) + lc.kv_lora_rank
                + lc.kv_lora_rank * h * (lc.qk_nope_head_dim + lc.v_head_dim) + h * lc.v_head_dim * d)
    else:
        attn = 4 * d * d
    moe_layers = sum(lc.is_moe_layer(i) for i in range(layers))
    dense_layers = layers - moe_layers
    expert = 3 * d * lc.moe_intermediate_size
    e = lc.n_routed_experts or 0
    routers = moe_layers * (e * d + (e if lc.topk_method == "noaux_tc" else 0))
    return ParamCounts(
        vision=vision, vision_unused_pool=pool, projector=projector, embed=lc.vocab_size * d,
        lm_head=lc.vocab_size * d, attention=layers * attn, dense_ffn=dense_layers * 3 * d * lc.intermediate_size,
        shared_experts=moe_layers * (lc.n_shared_experts or 0) * expert, routed_experts=moe_layers * e * expert,
        routers=routers, norms=layers * 2 * d + d, activated_routed=moe_layers * (lc.num_experts_per_tok or 0) * expert,
    )


def human(n: float, unit: str = "") -> str:
    """3 significant digits with K/M/B (counts) or KB/MB/GB (``unit="B"``, bytes, powers of 1000)."""
    suffixes = ("B", "KB", "MB", "GB", "TB") if unit == "B" else ("", "K", "M", "B", "T")
    for power, suffix in enumerate(suffixes):
        if abs(n) < 1000 or suffix == suffixes[-1]:
            return f"{n:.0f}{suffix}" if power == 0 else f"{n:.3g}{suffix}"  # whole units: no "1e+02"
        n /= 1000
    raise AssertionError("unreachable")
