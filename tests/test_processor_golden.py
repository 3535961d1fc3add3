"""The processor against the official processor's outputs (../shared/golden/processor/*.npz).

Every array must be identical, ``images`` bit-exact: that is the definition of correct.
"""

import json
from pathlib import Path

import numpy as np
import pytest

from dsvl2.processing import Processor

GOLDEN = Path(__file__).resolve().parents[1].parent / "shared" / "golden"
CASES = json.loads((GOLDEN / "cases.json").read_text()) if GOLDEN.is_dir() else []


@pytest.fixture(scope="module")
def processor(golden_dir):
    return Processor.from_pretrained(golden_dir / "checkpoints" / "micro-mha")


@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_processor_matches_official(processor, golden_dir, case):
    conversation = [
        {**m, "images": [golden_dir / p for p in m.get("images", [])]} for m in case["conversation"]
    ]
    batch = processor(conversation)
    expected = np.load(golden_dir / "processor" / f"{case['id']}.npz")
    assert len(batch) == 1 and batch.labels is None
    for key in ("input_ids", "attention_mask", "images_seq_mask", "images_spatial_crop"):
        got = getattr(batch, key)[0].numpy()
        assert got.dtype == expected[key].dtype, key
        assert np.array_equal(got, expected[key]), key
    images = batch.images[0].numpy()
    assert images.shape == expected["images"].shape
    assert np.array_equal(images, expected["images"])  # bit-exact, fp32
    assert batch.num_image_tokens[0] == expected["num_image_tokens"].tolist()
    assert batch.sft_format[0] == str(expected["sft_format"])


def test_golden_cases_present(golden_dir):
    assert len(CASES) == 14
