"""Model parity with the official implementation on the golden micro checkpoints (../shared/golden).

fp32: vision features, projector output, ``inputs_embeds`` and last-position logits within 1e-4 of
the official run, every greedy token identical, and each step's top-64 logits within 1e-4.
bf16: text-only cases are bit-identical to the official run (same kernels, same op order). With
images, the official run used torch 2.14's CPU kernels and ours are 2.13's: the bf16 ViT (SDPA,
conv) rounds differently, and ~1000 image tokens amplify that, so as the golden README prescribes
for other kernels we teacher-force the official tokens and compare, on all 14 cases, our logits at
the official top-64 token ids: mean deviation within 1.5-2 bf16 ulps and the official top-1 at every
step whose official top-2 margin exceeds 8 ulps (derivation in ``test_bf16_parity_every_case``).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import dsvl2
from golden_utils import STRUCTURES, cases, conversation, greedy, outputs, teacher_forced_logits

ATOL = 1e-4
GREEDY_CASES = ("one_image_chart", "no_image", "multi_turn")
# bf16 with images: bounds in ulps of the step's largest logit, at least 2**-5 (the ulp in [4, 8));
# derived in the bf16 test's docstring
MIN_ULP = 2.0 ** -5
MARGIN_ULPS = 8
CASE_MEAN_ULPS = 4
STRUCTURE_MEAN_ULPS = 1.5
GROSS_ULPS = 96


@pytest.fixture(scope="module", params=STRUCTURES)
def fp32_pipe(request, golden_dir):
    return request.param, dsvl2.load(golden_dir / "checkpoints" / request.param, dtype="fp32", device="cpu", exact=True)


@pytest.fixture(scope="module", params=STRUCTURES)
def bf16_pipe(request, golden_dir):
    return request.param, dsvl2.load(golden_dir / "checkpoints" / request.param, dtype="bf16", device="cpu", exact=True)


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
    """All 14 cases in bf16, logits compared by token id (the golden top-64 ids of every step).

    Text-only: the same kernels and op order as the official run, so bit-identical. With images the
    official run used torch 2.14's CPU kernels and ours are 2.13's: the bf16 ViT rounds differently
    (docs/parity.md), so the official tokens are teacher-forced and the comparison is statistical.

    The noise bound. bf16 keeps 8 significant bits: a logit in [4, 8) has an ulp of 2**-5 = 1/32, and
    two correct implementations that round differently upstream differ by whole ulps of that size.
    The golden logits here stay below 8 (median largest 4.4); bounds are in units of the ulp of each
    step's largest logit, never below 1/32, so a checkpoint with larger logits scales them. Measured over the 13 image cases x
    3 structures (docs/parity.md, "bf16 with images"): the deviation of a logit at a golden id is 0.021
    on average (0.7 ulp), at most 0.038 averaged over one case and 0.026 over one structure; the
    largest single deviation is 1.0 (noaux: a near-tied expert choice flips); our top-1 differs from
    the official token only at steps whose official top-2 margin is <= 0.125 (4 ulp, ties included).
    A top-1 swap needs the two logits' deviations to differ by more than the margin, so:

    - ``MARGIN_ULPS`` = 8 ulp = 0.25, twice the largest margin seen to swap: at every step whose
      official margin exceeds it our argmax must be the official token;
    - mean |deviation| <= ``STRUCTURE_MEAN_ULPS`` = 1.5 ulp over all image steps of a structure
      (measured: at most 0.97, also with torch's AVX2 kernels forced, as on a CPU without AVX512);
    - per case, mean <= ``CASE_MEAN_ULPS`` = 4 ulp and no single logit further than ``GROSS_ULPS`` =
      96 ulp = 3.0: a near-tied expert choice that flips moves a whole step, and where one flips
      depends on the CPU's GEMM kernels (AVX2 kernels: a noaux case at 2.40 ulp mean with a 51.75 ulp
      logit; AVX512: 1.2 and 32), so these two catch gross errors only, at ~1.7x the worst seen.

    Zeroing the local-canvas newline embedding (a mutation scripts/mutate.py applies) gives a mean
    deviation of 0.066-0.095 per structure (2.1-3.0 ulp) and top-1 swaps at margins up to 0.28-0.41.
    """
    structure, pipe = bf16_pipe
    image_devs = []
    for case in cases(golden_dir):
        ref = outputs(golden_dir, structure, "bf16", case["id"])
        batch = pipe.processor(conversation(golden_dir, case))
        golden_ids = ref["generated_ids"].tolist()
        logits = teacher_forced_logits(pipe, batch, golden_ids)
        text_only = int(batch.images_spatial_crop.sum()) == 0
        if text_only:  # same kernels and op order as the official run: bit-identical
            for i, step in enumerate(logits):
                np.testing.assert_array_equal(step.float().numpy()[ref["step_topk_ids"][i]], ref["step_topk_vals"][i])
            assert greedy(pipe, batch, len(golden_ids)) == golden_ids
            continue
        where = f"{structure}/{case['id']}"
        case_devs = []
        for i, step in enumerate(logits):
            ids, vals = ref["step_topk_ids"][i], ref["step_topk_vals"][i].astype(np.float64)
            ulp = max(MIN_ULP, 2.0 ** (math.floor(math.log2(np.abs(vals).max())) - 7))  # 8 significant bits
            dev = np.abs(step.double().numpy()[ids] - vals) / ulp  # in ulps
            assert dev.max() <= GROSS_ULPS, f"{where} step {i}: a logit is {dev.max()} ulp from the official one"
            margin = (vals[0] - vals[1]) / ulp
            if margin > MARGIN_ULPS:
                assert int(step.argmax()) == golden_ids[i], f"{where} step {i}: top-1 differs, margin {margin} ulp"
            case_devs.append(dev)
        mean = float(np.mean(case_devs))
        assert mean <= CASE_MEAN_ULPS, f"{where}: logits deviate by {mean:.2f} ulp on average"
        image_devs += case_devs
    mean = float(np.mean(image_devs))
    assert len(image_devs) > 200 and mean <= STRUCTURE_MEAN_ULPS, f"{structure}: mean deviation {mean:.2f} ulp"
