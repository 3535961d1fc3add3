"""Model parity with the official implementation on the golden micro checkpoints (../shared/golden).

fp32: vision features, projector output, ``inputs_embeds`` and last-position logits within 1e-4 of
the official run, every greedy token identical, and each step's top-64 logits within 1e-4.
bf16: text-only cases are bit-identical to the official run (same kernels, same op order). With
images, the official run used torch 2.14's CPU kernels and ours are 2.13's: the bf16 ViT (SDPA,
conv) rounds differently, and ~1000 image tokens amplify that, so as the golden README prescribes
for other kernels we teacher-force the official tokens and compare logits loosely (0.5 on logits
whose spread is several units) and require any top-1 disagreement to be a near-tie.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import dsvl2
from golden_utils import STRUCTURES, cases, conversation, greedy, outputs, teacher_forced_logits

ATOL = 1e-4
GREEDY_CASES = ("one_image_chart", "no_image", "multi_turn")
# bf16 runs are slower; a sample covering text-only, 1/2/3 images, tiling extremes and grounding.
BF16_CASES = ("no_image", "one_image_chart", "one_image_wide", "three_images", "grounding_ref", "multi_turn")


@pytest.fixture(scope="module", params=STRUCTURES)
def fp32_pipe(request, golden_dir):
    return request.param, dsvl2.load(golden_dir / "checkpoints" / request.param, dtype="fp32", device="cpu")


@pytest.fixture(scope="module", params=STRUCTURES)
def bf16_pipe(request, golden_dir):
    return request.param, dsvl2.load(golden_dir / "checkpoints" / request.param, dtype="bf16", device="cpu")


def _case_ids(golden):
    return [c["id"] for c in cases(golden)]


def _top_values(logits: torch.Tensor, k: int) -> np.ndarray:
    return np.sort(logits.float().numpy())[::-1][:k]


def test_fp32_parity_every_case(fp32_pipe, golden_dir):
    structure, pipe = fp32_pipe
    report = {}
    for case in cases(golden_dir):
        ref = outputs(golden_dir, structure, "fp32", case["id"])
        batch = pipe.processor(conversation(golden_dir, case))
        model = pipe.model
        with torch.no_grad():
            if "vision_features" in ref:
                n = ref["vision_features"].shape[0]
                feats = model.vision(batch.images[0, :n])
                np.testing.assert_allclose(feats.numpy(), ref["vision_features"], atol=ATOL, rtol=0)
                proj = model.projector(feats)
                np.testing.assert_allclose(proj.numpy(), ref["projector_out"], atol=ATOL, rtol=0)
            embeds = model.prepare_inputs_embeds(batch.input_ids, batch.images, batch.images_seq_mask,
                                                 batch.images_spatial_crop)
            np.testing.assert_allclose(embeds[0].numpy(), ref["inputs_embeds"], atol=ATOL, rtol=0,
                                       err_msg=f"{structure}/{case['id']}: inputs_embeds")
        golden_ids = ref["generated_ids"].tolist()
        logits = teacher_forced_logits(pipe, batch, golden_ids)
        if "prefill_logits_last" in ref:
            np.testing.assert_allclose(logits[0].numpy(), ref["prefill_logits_last"], atol=ATOL, rtol=0)
        np.testing.assert_allclose(_top_values(logits[0], 256), ref["prefill_logits_top256_vals"], atol=ATOL, rtol=0)
        worst = 0.0
        for i, step in enumerate(logits):
            diff = np.abs(_top_values(step, 64) - ref["step_topk_vals"][i]).max()
            worst = max(worst, float(diff))
        assert worst <= ATOL, f"{structure}/{case['id']}: step logits differ by {worst}"
        # Greedy decoding reproduces the golden tokens iff each teacher-forced step's argmax is the
        # golden token (induction over steps); the generate() loop itself is run on a few cases.
        argmax = [int(step.argmax()) for step in logits]
        assert argmax == golden_ids, f"{structure}/{case['id']}: greedy tokens differ"
        if case["id"] in GREEDY_CASES:
            assert greedy(pipe, batch, len(golden_ids)) == golden_ids
        report[case["id"]] = worst
    assert len(report) == 14


def test_bf16_parity_every_case(bf16_pipe, golden_dir):
    structure, pipe = bf16_pipe
    for case in (c for c in cases(golden_dir) if c["id"] in BF16_CASES):
        ref = outputs(golden_dir, structure, "bf16", case["id"])
        batch = pipe.processor(conversation(golden_dir, case))
        golden_ids = ref["generated_ids"].tolist()
        logits = teacher_forced_logits(pipe, batch, golden_ids)
        text_only = int(batch.images_spatial_crop.sum()) == 0
        if text_only:
            # Same kernels and op order as the official run: bit-identical.
            for i, step in enumerate(logits):
                np.testing.assert_array_equal(_top_values(step, 64), ref["step_topk_vals"][i])
            assert greedy(pipe, batch, len(golden_ids)) == golden_ids
            continue
        first = np.abs(_top_values(logits[0], 256) - ref["prefill_logits_top256_vals"]).max()
        assert first <= 0.15, f"{structure}/{case['id']}: prefill logits differ by {first}"
        for i, step in enumerate(logits):
            diff = np.abs(_top_values(step, 64) - ref["step_topk_vals"][i]).max()
            assert diff <= 0.5, f"{structure}/{case['id']} step {i}: top-64 logits differ by {diff}"
            margin = float(step.max() - step[golden_ids[i]])
            assert margin <= 0.5, f"{structure}/{case['id']} step {i}: golden token is {margin} below our top-1"
