"""Helpers to run the golden cases of ../shared/golden through dsvl2 (model-side parity tests)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

import dsvl2
from dsvl2.generation.generate import GenerateArgs, decode_one_token, prefill
from dsvl2.model.cache import make_cache

STRUCTURES = ("micro-mha", "micro-mla", "micro-mla-noaux")


def cases(golden: Path) -> list[dict]:
    return json.loads((golden / "cases.json").read_text())


def conversation(golden: Path, case: dict) -> list[dict]:
    return [dict(m, images=[str(golden / p) for p in m.get("images", [])]) for m in case["conversation"]]


def outputs(golden: Path, structure: str, dtype: str, case_id: str) -> dict[str, np.ndarray]:
    return dict(np.load(golden / "outputs" / f"{structure}-{dtype}" / f"{case_id}.npz"))


@torch.no_grad()
def teacher_forced_logits(pipe: "dsvl2.Pipeline", batch, token_ids: list[int]) -> list[torch.Tensor]:
    """Logits (V,) before each of ``token_ids`` when the golden tokens are fed back (batch of one)."""
    model = pipe.model
    embeds = model.prepare_inputs_embeds(batch.input_ids, batch.images, batch.images_seq_mask,
                                         batch.images_spatial_crop)
    t = batch.input_ids.shape[1]
    cache = make_cache(model.cfg.language_config, 1, t + len(token_ids), model.dtype, "cpu")
    mask = batch.attention_mask.bool()
    out = [prefill(model, embeds, mask, cache)[0]]
    for tok in token_ids[:-1]:
        mask = torch.cat([mask, torch.ones(1, 1, dtype=torch.bool)], dim=1)
        out.append(decode_one_token(model, torch.tensor([tok]), mask, cache)[0])
    return out


def greedy(pipe: "dsvl2.Pipeline", batch, n: int, **kw) -> list[int]:
    from dsvl2.generation.generate import generate

    steps = generate(pipe.model, batch.input_ids, batch.attention_mask, batch.images, batch.images_seq_mask,
                     batch.images_spatial_crop, GenerateArgs(max_new_tokens=n, **kw), pipe.tokenizer.eos_id)
    return [int(s.tokens[0]) for s in steps]
