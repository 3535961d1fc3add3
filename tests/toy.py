"""Toy models for fast tests: the ``toy`` preset (and MHA / noaux variants) with random weights."""

from __future__ import annotations

import dataclasses

import torch

from dsvl2.config import PRESETS, DSVL2Config
from dsvl2.model.init import FIXTURE_INIT, init_params_
from dsvl2.model.vlm import DSVL2


def toy_config(variant: str = "mla") -> DSVL2Config:
    cfg = PRESETS["toy"]
    lc = cfg.language_config
    if variant == "mha":
        lc = dataclasses.replace(lc, use_mla=False, kv_lora_rank=None, qk_nope_head_dim=0, qk_rope_head_dim=0,
                                 v_head_dim=0)
    elif variant == "noaux":
        lc = dataclasses.replace(lc, topk_method="noaux_tc", scoring_func="sigmoid", norm_topk_prob=True,
                                 routed_scaling_factor=2.0)
    elif variant != "mla":
        raise ValueError(variant)
    return dataclasses.replace(cfg, language_config=lc)


def toy_model(variant: str = "mla", seed: int = 0, dtype: torch.dtype = torch.float32) -> DSVL2:
    model = DSVL2(toy_config(variant))
    init_params_(model, seed, **FIXTURE_INIT)
    return model.to(dtype).eval()


def toy_batch(model: DSVL2, seed: int = 0, lengths: tuple[int, ...] = (40,), images: bool = True):
    """A left-padded batch of random token rows, each with one 2x1-tiled image spliced in."""
    g = torch.Generator().manual_seed(seed)
    cfg = model.cfg
    from dsvl2.processing.layout import num_image_tokens

    n_img = num_image_tokens(2, 1, cfg.grid) if images else 0
    t = max(lengths) + n_img
    b = len(lengths)
    ids = torch.full((b, t), 2, dtype=torch.long)
    mask = torch.zeros(b, t, dtype=torch.bool)
    seq_mask = torch.zeros(b, t, dtype=torch.bool)
    for r, n in enumerate(lengths):
        row = torch.randint(3, 1000, (n + n_img,), generator=g)
        start = t - n - n_img
        ids[r, start:] = row
        mask[r, start:] = True
        if images:
            seq_mask[r, start + 3:start + 3 + n_img] = True
            ids[r, start + 3:start + 3 + n_img] = 999
    size = cfg.vision_config.image_size
    tiles = torch.randn(b, 3, 3, size, size, generator=g) if images else None
    crop = torch.tensor([[[2, 1]]] * b) if images else None
    return ids, mask, tiles, seq_mask if images else None, crop
