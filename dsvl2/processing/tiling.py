"""Dynamic tiling of one image into a global view plus a grid of local tiles.

Reproduces ``select_best_resolution`` and the image half of ``tokenize_with_images`` in the
official ``deepseek_vl2/models/processing_deepseek_vl_v2.py``, which delegate the resize to
Pillow's ``ImageOps.pad`` (Pillow ``src/PIL/ImageOps.py``: ``contain`` + ``pad``) and the pixel
scaling to torchvision's ``ToTensor`` + ``Normalize`` (spec sections 5.3-5.5).

The pad steps are written out here rather than calling ``ImageOps.pad`` so the two exactness
traps stay visible: Python's ``round`` (banker's rounding) for both the resized side and the
paste offset, and a pad colour of ``int(0.5 * 255) = 127``. ``tests/test_tiling.py`` holds this
equal to ``ImageOps.pad`` itself.
"""

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from dsvl2.errors import ConfigError, InputError


def select_best_resolution(size: tuple[int, int], candidates: Sequence[Sequence[int]]) -> tuple[int, int]:
    """Pick the ``(width, height)`` candidate that keeps the most pixels, then wastes the least.

    Exact rule of the official code: the image is scaled to fit each candidate; the effective
    resolution is the truncated scaled area capped at the original area (upscaling gains
    nothing); strict comparisons make the earliest candidate win exact ties.
    """
    width, height = size
    if width <= 0 or height <= 0:
        raise InputError(f"select_best_resolution needs a positive image size, got {width}x{height}")
    if not candidates:
        raise ConfigError("select_best_resolution needs at least one candidate resolution "
                          "(candidate_resolutions in processor_config.json is empty)")
    best: tuple[int, int] | None = None
    max_effective = 0
    min_wasted = float("inf")
    for cw, ch in candidates:
        scale = min(cw / width, ch / height)
        effective = min(int(width * scale) * int(height * scale), width * height)
        wasted = cw * ch - effective
        if effective > max_effective or (effective == max_effective and wasted < min_wasted):
            max_effective, min_wasted, best = effective, wasted, (int(cw), int(ch))
    assert best is not None  # the first candidate always wins against min_wasted = inf
    return best


def contain_size(size: tuple[int, int], target: tuple[int, int]) -> tuple[int, int]:
    """Size of ``ImageOps.contain``: fit inside ``target`` keeping the aspect ratio.

    The free side is ``round()``-ed (banker's rounding, float64), as Pillow does.
    """
    width, height = size
    tw, th = target
    im_ratio = width / height
    dest_ratio = tw / th
    if im_ratio == dest_ratio:
        return tw, th
    if im_ratio > dest_ratio:
        return tw, round(height / width * tw)
    return round(width / height * th), th


def pad_to(image: Image.Image, size: tuple[int, int], color: tuple[int, int, int] = (127, 127, 127)) -> Image.Image:
    """``ImageOps.pad(image, size, method=BICUBIC, color=color, centering=(0.5, 0.5))``.

    Bicubic resize to the contained size, then paste centred on a ``color`` canvas at
    ``round(free_space * 0.5)`` (banker's rounding: 1.5 -> 2, 2.5 -> 2).
    """
    tw, th = size
    new_w, new_h = contain_size(image.size, size)
    if new_w < 1 or new_h < 1:
        raise InputError(
            f"image of {image.size[0]}x{image.size[1]} pixels is too elongated: it would shrink to "
            f"{new_w}x{new_h} inside the {tw}x{th} view (aspect ratio limit about {max(tw, th) * 2}:1)"
        )
    resized = image.resize((new_w, new_h), resample=Image.Resampling.BICUBIC)
    if (new_w, new_h) == (tw, th):
        return resized
    canvas = Image.new(image.mode, (tw, th), color)
    if new_w != tw:
        canvas.paste(resized, (round((tw - new_w) * 0.5), 0))
    else:
        canvas.paste(resized, (0, round((th - new_h) * 0.5)))
    return canvas


def tile_image(
    image: Image.Image,
    candidates: Sequence[Sequence[int]],
    image_size: int,
    cropping: bool,
    color: tuple[int, int, int] = (127, 127, 127),
    resolution: tuple[int, int] | None = None,
) -> tuple[list[Image.Image], int, int]:
    """Cut ``image`` into ``[global view, local tiles row-major]`` and return them with ``nw, nh``.

    With ``cropping`` the local canvas is the best candidate resolution, otherwise a single
    ``image_size`` tile (identical pixels to the global view); ``resolution`` (a token budget's
    choice, :mod:`.budget`) overrides both. ``nw``/``nh`` count tiles across and down.
    """
    if resolution is not None:
        best_w, best_h = resolution
    elif cropping:
        best_w, best_h = select_best_resolution(image.size, candidates)
    else:
        best_w, best_h = image_size, image_size
    if best_w % image_size or best_h % image_size:
        raise ConfigError(
            f"candidate resolution {best_w}x{best_h} is not a multiple of the tile size {image_size} "
            f"(candidate_resolutions / image_size in processor_config.json)"
        )
    tiles = [pad_to(image, (image_size, image_size), color)]
    local = pad_to(image, (best_w, best_h), color)
    for y in range(0, best_h, image_size):
        for x in range(0, best_w, image_size):
            tiles.append(local.crop((x, y, x + image_size, y + image_size)))
    return tiles, best_w // image_size, best_h // image_size


def normalize(
    tiles: Sequence[Image.Image],
    mean: Sequence[float] | None = (0.5, 0.5, 0.5),
    std: Sequence[float] | None = (0.5, 0.5, 0.5),
) -> torch.Tensor:
    """RGB tiles -> float32 ``[N, 3, S, S]``: ``x / 255`` then ``(x - mean) / std``.

    The same float32 ops as torchvision ``ToTensor`` (``.float().div(255)``) and ``Normalize``
    (``.sub(mean).div(std)``), applied to the whole stack at once (element-wise, so bit-identical
    to the per-tile official loop). ``mean=None`` skips the normalisation (``normalize: false``).
    """
    if not tiles:
        raise InputError("normalize needs at least one tile, got 0")
    rgb = [t if t.mode == "RGB" else t.convert("RGB") for t in tiles]
    pixels = np.stack([np.asarray(t, dtype=np.uint8) for t in rgb])  # (N, S, S, 3)
    x = torch.from_numpy(pixels).permute(0, 3, 1, 2).to(torch.float32).div(255)  # (N, 3, S, S)
    if mean is not None and std is not None:
        mean_t = torch.as_tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        std_t = torch.as_tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        x = x.sub(mean_t).div(std_t)
    return x.contiguous()
