"""Token-budget tiling: hand-computed allocations, the budget never exceeded, global views kept,
determinism, and the official rule untouched without a budget."""

from random import Random

import pytest
from PIL import Image

from dsvl2.errors import InputError
from dsvl2.processing.budget import allocate_resolutions, effective_pixels
from dsvl2.processing.layout import num_image_tokens
from dsvl2.processing.processor import DEFAULT_CANDIDATE_RESOLUTIONS, Processor
from dsvl2.processing.tiling import select_best_resolution

CANDS = DEFAULT_CANDIDATE_RESOLUTIONS


def tokens(res):
    return num_image_tokens(res[0] // 384, res[1] // 384, 14)


def allocate(sizes, budget):
    return allocate_resolutions(sizes, CANDS, 384, 14, budget)


def test_hand_computed_allocations():
    # three 800x600 images each want 3x2 (1415 tokens, spec 5.6): 4245 fits 5000, so they get it
    assert allocate([(800, 600)] * 3, 5000) == [(1152, 768)] * 3
    # the minimum is 421 per image (global view + one tile)
    assert allocate([(800, 600)] * 3, 1263) == [(384, 384)] * 3
    with pytest.raises(InputError, match="below the minimum for 3 image.*1263"):
        allocate([(800, 600)] * 3, 1262)
    # a 384x384 photo is shown in full at 1x1; a 768x768 page gains 442,368 pixels from 2x2 for 602 extra
    # tokens (1023 - 421), and no cheaper candidate shows it larger: (768, 384) fits it at 384x384 again
    assert allocate([(384, 384), (768, 768), (384, 384)], 3 * 421 + 602) == [(384, 384), (768, 768), (384, 384)]
    assert allocate([(384, 384), (768, 768), (384, 384)], 3 * 421 + 601) == [(384, 384)] * 3
    assert effective_pixels((768, 768), (768, 768)) - effective_pixels((768, 768), (384, 384)) == 442368


def test_more_tiles_go_where_they_show_more():
    # a tall page, a small photo and a wide chart with room for about 1,500 extra tokens
    sizes = [(1240, 1754), (320, 240), (1600, 600)]
    chosen = allocate(sizes, 3 * 421 + 1500)
    assert chosen[1] == (384, 384)  # the photo is already shown in full at 1x1
    assert tokens(chosen[0]) > 421 and tokens(chosen[2]) > 421


@pytest.mark.parametrize("seed", range(6))
def test_budget_never_exceeded_and_deterministic(seed):
    rng = Random(seed)
    sizes = [(rng.randint(100, 3000), rng.randint(100, 3000)) for _ in range(rng.randint(3, 5))]
    for budget in (len(sizes) * 421, 1500 + 421 * len(sizes), 2500, 3500, 8000):
        if budget < 421 * len(sizes):
            continue
        chosen = allocate(sizes, budget)
        assert sum(tokens(r) for r in chosen) <= budget
        assert all(tuple(r) in CANDS for r in chosen)
        assert chosen == allocate(sizes, budget)
        # never more than the image would get alone, and no upgrade that fits was left out
        for s, r in zip(sizes, chosen):
            assert effective_pixels(s, r) <= effective_pixels(s, select_best_resolution(s, CANDS))
        left = budget - sum(tokens(r) for r in chosen)
        for s, r in zip(sizes, chosen):
            assert not any(effective_pixels(s, c) > effective_pixels(s, r) and tokens(c) - tokens(r) <= left
                           for c in CANDS)


@pytest.fixture(scope="module")
def proc(golden_dir):
    return Processor.from_pretrained(golden_dir / "checkpoints" / "micro-mha")


def test_processor_follows_the_budget_and_keeps_the_official_rule_without_one(proc):
    images = [Image.new("RGB", s, (200, 30, 30)) for s in ((1240, 1754), (320, 240), (1600, 600))]
    conv = [{"role": "user", "content": "<image>\n<image>\n<image>\nCompare.", "images": images}]
    official = proc([conv])
    assert official.num_image_tokens == [[421, 421, 421]]  # 3 images: tiling off (spec 5.2)
    budget = proc([conv], image_token_budget=2800)
    counts = budget.num_image_tokens[0]
    assert sum(counts) <= 2800 and min(counts) >= 421
    expected = allocate([im.size for im in images], 2800)
    crops = budget.images_spatial_crop[0].tolist()
    assert crops == [[w // 384, h // 384] for w, h in expected]
    assert counts == [tokens(r) for r in expected]
    n_tiles = sum(1 + nw * nh for nw, nh in crops)  # a global view + nw*nh local tiles per image
    assert int((budget.images[0].abs().sum((1, 2, 3)) > 0).sum()) == n_tiles
    assert int(budget.images_seq_mask.sum()) == sum(counts)
    # one image with a budget it fits: exactly the official layout
    one = [{"role": "user", "content": "<image>\nRead.", "images": [images[0]]}]
    assert proc([one], image_token_budget=4000).images_spatial_crop.tolist() == proc([one]).images_spatial_crop.tolist()
