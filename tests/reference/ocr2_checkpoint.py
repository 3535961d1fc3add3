"""A small random DeepSeek-OCR 2 checkpoint in the official layout, written without dsvl2.

Shared by ``scripts/make_ocr2_fixtures.py`` (which runs transformers' DeepseekOcr2 on it in its own
environment) and ``tests/test_ocr2_parity.py`` (which loads it with dsvl2): both sides read the same
file, so a wrong key, shape or layout on either side shows up. Key names and shapes are written here
from the official modules (``sam_model.blocks.N.attn.rel_pos_h``, ``qwen2_model.model.model.layers``,
``view_seperator``...), independently of ``dsvl2/checkpoint.py``. Weights come from one seeded
``torch.Generator``: the same torch version regenerates the same bytes (the fixture stores their
SHA-256 and the test checks it).

Dimensions: SAM width 32, 4 blocks (global 1 and 3), windows of 14, 4-px patches on 256-px global
views and 192-px tiles, so the patch grids are the real 64x64 and 48x48 (window padding, position
resize and rel-pos resize all run) and the query counts are the real 256 and 144 (transformers
hard-codes them). Query encoder width 32, 2 layers, 4 heads / 2 KV heads. Language model: Tiny's
structure at hidden 64, 2 layers (dense, MoE with 8 experts top-2 + 1 shared), vocabulary 512.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

SEED = 18
IMAGE_TOKEN_ID = 100
DIMS = dict(
    image_size=256, tile_size=192, patch=4, sam_width=32, sam_layers=4, sam_heads=2, global_layers=(1, 3),
    window=14, neck=16, mid=24, dim=32, enc_layers=2, enc_heads=4, enc_kv=2, enc_inter=64,
    hidden=64, vocab=512, inter=128, moe_inter=32, heads=4, experts=8, top_k=2, shared=1, lm_layers=2,
)
# The released model's dimensions (bench/ocr2.py; its language depth can be cut with lm_layers).
REAL_DIMS = dict(
    image_size=1024, tile_size=768, patch=16, sam_width=768, sam_layers=12, sam_heads=12, global_layers=(2, 5, 8, 11),
    window=14, neck=256, mid=512, dim=896, enc_layers=24, enc_heads=14, enc_kv=2, enc_inter=4864,
    hidden=1280, vocab=129280, inter=6848, moe_inter=896, heads=10, experts=64, top_k=6, shared=2, lm_layers=12,
)


def config_json(d: dict = DIMS) -> dict:
    lang = dict(
        vocab_size=d["vocab"], hidden_size=d["hidden"], intermediate_size=d["inter"],
        moe_intermediate_size=d["moe_inter"], num_hidden_layers=d["lm_layers"], num_attention_heads=d["heads"],
        num_key_value_heads=d["heads"], n_routed_experts=d["experts"], n_shared_experts=d["shared"],
        num_experts_per_tok=d["top_k"], first_k_dense_replace=1, moe_layer_freq=1, topk_method="greedy",
        n_group=1, topk_group=1, use_mla=False, kv_lora_rank=None, q_lora_rank=None, qk_nope_head_dim=0,
        qk_rope_head_dim=0, v_head_dim=0, max_position_embeddings=4096, bos_token_id=0, eos_token_id=1,
        rms_norm_eps=1e-6, rope_theta=10000.0, routed_scaling_factor=1.0, norm_topk_prob=False,
    )
    return {
        "architectures": ["DeepseekOCR2ForCausalLM"], "model_type": "deepseek_vl_v2",
        "candidate_resolutions": [[d["image_size"], d["image_size"]]], "global_view_pos": "head", "tile_tag": "2D",
        "hidden_size": d["hidden"], "vocab_size": d["vocab"],  # the released file repeats language keys
        "language_config": lang,
        "vision_config": {
            "model_type": "vision", "model_name": "deepencoderv2", "image_size": d["image_size"],
            "tile_size": d["tile_size"], "mlp_ratio": 3.7362,
            "width": {
                "sam_vit_b": {"width": d["sam_width"], "layers": d["sam_layers"], "heads": d["sam_heads"],
                              "global_attn_indexes": list(d["global_layers"]),
                              "downsample_channels": [d["mid"], d["dim"]], "patch_size": d["patch"],
                              "window_size": d["window"], "neck_channels": d["neck"]},
                "qwen2-0-5b": {"dim": d["dim"], "layers": d["enc_layers"], "heads": d["enc_heads"],
                               "kv_heads": d["enc_kv"], "intermediate_size": d["enc_inter"]},
            },
        },
        "projector_config": {"model_type": "mlp_projector", "projector_type": "linear",
                             "input_dim": d["dim"], "n_embed": d["hidden"]},
    }


def official_shapes(d: dict = DIMS) -> dict[str, tuple[int, ...]]:
    w, p, g = d["sam_width"], d["patch"], d["image_size"] // d["patch"]
    hd = w // d["sam_heads"]
    s: dict[str, tuple[int, ...]] = {
        "model.sam_model.patch_embed.proj.weight": (w, 3, p, p), "model.sam_model.patch_embed.proj.bias": (w,),
        "model.sam_model.pos_embed": (1, g, g, w),
    }
    for i in range(d["sam_layers"]):
        b = f"model.sam_model.blocks.{i}."
        size = g if i in d["global_layers"] else d["window"]
        s.update({b + "norm1.weight": (w,), b + "norm1.bias": (w,), b + "attn.qkv.weight": (3 * w, w),
                  b + "attn.qkv.bias": (3 * w,), b + "attn.proj.weight": (w, w), b + "attn.proj.bias": (w,),
                  b + "attn.rel_pos_h": (2 * size - 1, hd), b + "attn.rel_pos_w": (2 * size - 1, hd),
                  b + "norm2.weight": (w,), b + "norm2.bias": (w,), b + "mlp.lin1.weight": (4 * w, w),
                  b + "mlp.lin1.bias": (4 * w,), b + "mlp.lin2.weight": (w, 4 * w), b + "mlp.lin2.bias": (w,)})
    n, mid, dim = d["neck"], d["mid"], d["dim"]
    s.update({"model.sam_model.neck.0.weight": (n, w, 1, 1), "model.sam_model.neck.1.weight": (n,),
              "model.sam_model.neck.1.bias": (n,), "model.sam_model.neck.2.weight": (n, n, 3, 3),
              "model.sam_model.neck.3.weight": (n,), "model.sam_model.neck.3.bias": (n,),
              "model.sam_model.net_2.weight": (mid, n, 3, 3), "model.sam_model.net_3.weight": (dim, mid, 3, 3)})
    ehd = dim // d["enc_heads"]
    for i in range(d["enc_layers"]):
        b = f"model.qwen2_model.model.model.layers.{i}."
        s.update({b + "self_attn.q_proj.weight": (d["enc_heads"] * ehd, dim), b + "self_attn.q_proj.bias": (dim,),
                  b + "self_attn.k_proj.weight": (d["enc_kv"] * ehd, dim), b + "self_attn.k_proj.bias": (d["enc_kv"] * ehd,),
                  b + "self_attn.v_proj.weight": (d["enc_kv"] * ehd, dim), b + "self_attn.v_proj.bias": (d["enc_kv"] * ehd,),
                  b + "self_attn.o_proj.weight": (dim, dim), b + "mlp.gate_proj.weight": (d["enc_inter"], dim),
                  b + "mlp.up_proj.weight": (d["enc_inter"], dim), b + "mlp.down_proj.weight": (dim, d["enc_inter"]),
                  b + "input_layernorm.weight": (dim,), b + "post_attention_layernorm.weight": (dim,)})
    h = d["hidden"]
    s.update({"model.qwen2_model.model.model.norm.weight": (dim,), "model.qwen2_model.query_768.weight": (144, dim),
              "model.qwen2_model.query_1024.weight": (256, dim), "model.projector.layers.weight": (h, dim),
              "model.projector.layers.bias": (h,), "model.view_seperator": (h,),
              "model.embed_tokens.weight": (d["vocab"], h), "model.norm.weight": (h,), "lm_head.weight": (d["vocab"], h)})
    for i in range(d["lm_layers"]):
        b = f"model.layers.{i}."
        s.update({b + f"self_attn.{x}_proj.weight": (h, h) for x in "qkvo"})
        s.update({b + "input_layernorm.weight": (h,), b + "post_attention_layernorm.weight": (h,)})
    s.update({"model.layers.0.mlp.gate_proj.weight": (d["inter"], h), "model.layers.0.mlp.up_proj.weight": (d["inter"], h),
              "model.layers.0.mlp.down_proj.weight": (h, d["inter"])})
    mi, si = d["moe_inter"], d["moe_inter"] * d["shared"]
    for i in range(1, d["lm_layers"]):  # layer 0 dense (first_k_dense_replace 1), the others MoE
        b = f"model.layers.{i}.mlp."
        s[b + "gate.weight"] = (d["experts"], h)
        for j in range(d["experts"]):
            e = f"{b}experts.{j}."
            s.update({e + "gate_proj.weight": (mi, h), e + "up_proj.weight": (mi, h), e + "down_proj.weight": (h, mi)})
        s.update({b + "shared_experts.gate_proj.weight": (si, h), b + "shared_experts.up_proj.weight": (si, h),
                  b + "shared_experts.down_proj.weight": (h, si)})
    return s


def official_state(d: dict = DIMS, dtype: torch.dtype = torch.float32):
    """(key, tensor) in key order. Non-trivial weights: N(0, 1/fan_in) matrices, norms 1 + N(0, 0.1),
    decisive router; drawn in fp32, then cast to ``dtype``."""
    g = torch.Generator().manual_seed(SEED)
    for key, shape in sorted(official_shapes(d).items()):
        x = torch.randn(shape, generator=g)
        if key.endswith(("norm1.weight", "norm2.weight", "layernorm.weight", "norm.weight", "neck.1.weight",
                         "neck.3.weight")):
            x = 1 + 0.1 * x
        elif key.endswith("mlp.gate.weight"):
            x = 4 * x / shape[-1] ** 0.5
        elif key.endswith(("embed_tokens.weight", "query_768.weight", "query_1024.weight")):
            pass
        elif key.endswith(("pos_embed", "rel_pos_h", "rel_pos_w")):
            x = 0.5 * x
        elif len(shape) == 1:
            x = 0.1 * x
        else:
            x = x / (x[0].numel() if len(shape) == 4 else shape[-1]) ** 0.5
        yield key, x.to(dtype).contiguous()


def write_checkpoint(directory: Path) -> str:
    """Write config.json + model.safetensors; return the SHA-256 of the weights file."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config_json(), indent=2) + "\n")
    save_file(dict(official_state()), str(directory / "model.safetensors"), metadata={"format": "pt"})
    return hashlib.sha256((directory / "model.safetensors").read_bytes()).hexdigest()


def write_sharded(directory: Path, d: dict, dtype: torch.dtype = torch.bfloat16, shard_bytes: int = 1 << 30) -> None:
    """config.json + shards of about ``shard_bytes`` + index: large checkpoints without holding them whole."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config_json(d), indent=2) + "\n")
    shards, current, size = [], {}, 0
    weight_map = {}

    def flush() -> None:
        name = f"model-{len(shards) + 1:05d}.safetensors"
        save_file(current, str(directory / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in current})
        shards.append(name)

    for key, t in official_state(d, dtype):
        current[key] = t
        size += t.numel() * t.element_size()
        if size >= shard_bytes:
            flush()
            current, size = {}, 0
    if current:
        flush()
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def inputs() -> dict[str, torch.Tensor]:
    """Prompt ids and pixels: a cropped 3x2-tile image then an uncropped one, BOS first (official)."""
    d = DIMS
    g = torch.Generator().manual_seed(SEED + 1)
    n1 = 256 + 1 + 6 * 144
    n2 = 256 + 1
    ids = [0, 5, 9] + [IMAGE_TOKEN_ID] * n1 + [11, 12, 13] + [IMAGE_TOKEN_ID] * n2 + [20, 21, 22, 23]
    return {
        "input_ids": torch.tensor([ids]),
        "global_views": torch.rand(2, 3, d["image_size"], d["image_size"], generator=g) * 2 - 1,
        "tiles": torch.rand(6, 3, d["tile_size"], d["tile_size"], generator=g) * 2 - 1,
        "images_spatial_crop": torch.tensor([[[3, 2], [1, 1]]]),
    }


# Odd sizes for the processor: at and just past the 768 crop threshold, tall, wide, square, tiny.
ODD_SIZES = [(768, 768), (769, 300), (300, 769), (1000, 1000), (1025, 575), (1537, 769), (333, 777), (50, 2000),
             (2000, 51), (1280, 1024), (1001, 799)]


def synthetic_image(width: int, height: int):
    """A deterministic RGB test pattern (gradients and stripes: resampling has something to do)."""
    import numpy as np
    from PIL import Image

    y, x = np.mgrid[0:height, 0:width]
    r = (x * 255 // max(1, width - 1)).astype(np.uint8)
    g = (y * 255 // max(1, height - 1)).astype(np.uint8)
    b = (((x // 7) + (y // 5)) % 2 * 200 + 20).astype(np.uint8)
    return Image.fromarray(np.stack([r, g, b], axis=-1), "RGB")


# The slow real-dims check: the released vision side (SAM ViT-B, 24-layer query encoder) in fp32, with
# the language model cut to 2 layers so that both implementations fit in memory beside other jobs.
REAL_VISION_DIMS = {**REAL_DIMS, "lm_layers": 2}


def real_inputs() -> dict[str, torch.Tensor]:
    """A 2x1-tiled image at the real sizes (1024 global view, two 768 tiles), BOS first."""
    g = torch.Generator().manual_seed(SEED + 2)
    n = 256 + 1 + 2 * 144
    ids = [0, 5, 9] + [IMAGE_TOKEN_ID] * n + [11, 12, 13, 14]
    return {
        "input_ids": torch.tensor([ids]),
        "global_views": torch.rand(1, 3, 1024, 1024, generator=g) * 2 - 1,
        "tiles": torch.rand(2, 3, 768, 768, generator=g) * 2 - 1,
        "images_spatial_crop": torch.tensor([[[2, 1]]]),
    }
