"""Token-budget tiling: choose every image's tile layout so a conversation's image tokens fit a budget.

The official processor tiles each image of a conversation with at most 2 images by
``select_best_resolution`` and switches tiling off (one 384x384 local tile, 421 tokens) for all images
when there are 3 or more (spec 5.2), so three document pages become three unreadable thumbnails.
With ``image_token_budget=N`` (opt-in; without it the official rule stands) the layouts are chosen
instead by this rule, for any number of images:

1. Each image *wants* the layout ``select_best_resolution`` gives it alone (the official choice for
   a conversation of one or two images). If the wanted layouts fit the budget, they are used.
2. Otherwise every image starts at 1x1 (global view + one local tile: the official 3+-image layout,
   the least an image can take). If even that exceeds the budget, it is an error naming the minimum.
3. Then, repeatedly, the upgrade with the most *effective pixels gained per extra token* is made:
   for image i, an upgrade is any candidate resolution that shows more of it (larger effective
   area, ``min(fitted area, original area)`` as ``select_best_resolution`` counts it) and whose
   extra tokens fit in what is left of the budget (one that shows more for no extra tokens ranks
   first). Ties go to fewer extra tokens, then to the
   earlier image, then to the earlier candidate. It stops when no upgrade fits.

So a large page gets tiles before a small photo that 1x1 already shows in full, the budget is never
exceeded, every image keeps its global view, and the result depends only on the image sizes, the
candidates and the budget. Token counts come from :func:`dsvl2.processing.layout.num_image_tokens`.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence

from dsvl2.errors import InputError
from dsvl2.processing.layout import num_image_tokens
from dsvl2.processing.tiling import select_best_resolution


def effective_pixels(size: tuple[int, int], resolution: Sequence[int]) -> int:
    """Pixels of a ``size`` image kept when fitted into ``resolution`` (select_best_resolution's count)."""
    width, height = size
    cw, ch = resolution
    scale = min(cw / width, ch / height)
    return min(int(width * scale) * int(height * scale), width * height)


def layout_tokens(resolution: Sequence[int], image_size: int, grid: int) -> int:
    return num_image_tokens(resolution[0] // image_size, resolution[1] // image_size, grid)


def allocate_resolutions(sizes: Sequence[tuple[int, int]], candidates: Sequence[Sequence[int]], image_size: int,
                         grid: int, budget: int) -> list[tuple[int, int]]:
    """The local-canvas resolution ``(width, height)`` of each image under ``budget`` image tokens."""
    if isinstance(budget, bool) or not isinstance(budget, numbers.Integral):
        raise InputError(f"image_token_budget must be an integer, got {budget!r}")
    if not sizes:
        return []
    wanted = [select_best_resolution(s, candidates) for s in sizes]
    if sum(layout_tokens(r, image_size, grid) for r in wanted) <= budget:
        return wanted
    base = (image_size, image_size)
    minimum = layout_tokens(base, image_size, grid)
    if minimum * len(sizes) > budget:
        raise InputError(f"image_token_budget {budget} is below the minimum for {len(sizes)} image(s): each needs at "
                         f"least {minimum} tokens (global view + one tile), {minimum * len(sizes)} in all")
    chosen = [base] * len(sizes)
    left = budget - minimum * len(sizes)
    options = [(tuple(int(v) for v in c), layout_tokens(c, image_size, grid)) for c in candidates]
    full = [effective_pixels(s, w) for s, w in zip(sizes, wanted)]
    open_ = set(range(len(sizes)))
    while open_:
        # the image showing the smallest share of what it would show alone; ties: the earlier one
        i = min(open_, key=lambda j: (effective_pixels(sizes[j], chosen[j]) / full[j], j))
        now_pixels = effective_pixels(sizes[i], chosen[i])
        now_tokens = layout_tokens(chosen[i], image_size, grid)
        best = None  # (extra tokens, -gain, candidate index)
        for k, (res, tokens) in enumerate(options):
            extra, gain = tokens - now_tokens, effective_pixels(sizes[i], res) - now_pixels
            if gain > 0 and extra <= left and (best is None or (extra, -gain, k) < best[0]):
                best = ((extra, -gain, k), res, extra)
        if best is None:
            open_.discard(i)
            continue
        _, chosen[i], extra = best
        left -= extra
    return chosen
