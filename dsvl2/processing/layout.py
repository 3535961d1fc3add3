"""Image-token counts of the DeepSeek-VL2 2D tile layout: the single source of truth.

Reproduces the arithmetic of ``tokenize_with_images`` in the official
``deepseek_vl2/models/processing_deepseek_vl_v2.py`` and the layout built by
``prepare_inputs_embeds`` in ``modeling_deepseek_vl_v2.py`` (spec sections 4.2 and 5.6).
The processor uses these functions to emit ``<image>`` placeholders and the model asserts the
length of its image-embedding splice against them, so the two can never disagree.

Per image (``tile_tag="2D"``, ``global_view_pos="head"``), with ``g`` the side of one tile after
the projector:

    GLOBAL  g rows of (g tokens + 1 newline)               g * (g + 1)
    SEP     one view separator                              1
    LOCAL   (nh * g) rows of (nw * g tokens + 1 newline)    g * nh * (g * nw + 1)
"""

import math

from dsvl2.errors import ConfigError, InputError


def tile_grid(image_size: int, patch_size: int, downsample_ratio: int) -> int:
    """Side of one tile's token grid after the projector: ceil((S // patch) / downsample).

    384 / 14 / 2 -> ceil(27 / 2) = 14. The ViT drops the pixels that do not fill a whole patch
    (384 // 14 = 27) and the projector pads the odd grid before its 2x2 unfold, hence the ceil.
    """
    if image_size <= 0 or patch_size <= 0 or downsample_ratio <= 0:
        raise ConfigError(
            f"tile_grid needs positive sizes, got image_size={image_size}, "
            f"patch_size={patch_size}, downsample_ratio={downsample_ratio}"
        )
    return math.ceil((image_size // patch_size) / downsample_ratio)


def num_image_tokens(nw: int, nh: int, grid: int) -> int:
    """Number of ``<image>`` positions one image occupies for ``nw x nh`` local tiles.

    grid 14: 1x1 -> 421, 2x2 -> 1023, 3x2 (nw=3, nh=2) -> 1415.
    """
    if nw < 1 or nh < 1 or grid < 1:
        raise InputError(f"num_image_tokens needs nw, nh, grid >= 1, got nw={nw}, nh={nh}, grid={grid}")
    return grid * (grid + 1) + 1 + grid * nh * (grid * nw + 1)
