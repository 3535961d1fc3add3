"""Image-token counts of processing/layout.py, hand-computed (spec 4.2)."""

import pytest

from dsvl2.processing.layout import num_image_tokens, tile_grid


def test_tile_grid_real_and_small_tiles():
    assert tile_grid(384, 14, 2) == 14  # ceil(27 / 2)
    assert tile_grid(224, 14, 2) == 8  # 16 / 2
    assert tile_grid(392, 14, 2) == 14  # 28 / 2
    assert tile_grid(98, 14, 2) == 4  # ceil(7 / 2)


@pytest.mark.parametrize(
    ("nw", "nh", "expected"),
    [(1, 1, 421), (2, 2, 1023), (3, 2, 1415), (2, 3, 1429), (3, 3, 2017), (1, 9, 2101), (9, 1, 1989)],
)
def test_num_image_tokens_examples(nw, nh, expected):
    assert num_image_tokens(nw, nh, 14) == expected
    assert expected == 211 + 196 * nw * nh + 14 * nh


def test_num_image_tokens_small_grid():
    # grid 8: global 8*9, separator 1, local (nh*8) rows of (nw*8 + 1)
    assert num_image_tokens(1, 1, 8) == 72 + 1 + 8 * 9
    assert num_image_tokens(2, 2, 8) == 72 + 1 + 16 * 17


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="nw=0"):
        num_image_tokens(0, 1, 14)
    with pytest.raises(ValueError, match="patch_size=0"):
        tile_grid(384, 0, 2)
