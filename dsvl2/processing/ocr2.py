"""DeepSeek-OCR 2 processor: a plain prompt + images -> model inputs, as the official scripts build them.

Reproduces ``DeepseekOCR2Processor.tokenize_with_images`` and ``dynamic_preprocess`` of the official
``DeepSeek-OCR2-vllm/process/image_process.py`` with its ``config.py`` settings (crop mode on,
2-6 tiles):

- global view: the image fitted into ``image_size`` (1024) x ``image_size`` with ``ImageOps.pad``
  (bicubic, centred, grey 127 borders; small images are enlarged);
- local tiles, only when a side exceeds ``tile_size`` (768): the tile grid (nw, nh) with nw*nh in
  2..6 whose aspect ratio is closest to the image's (ties: the later candidate wins while the image
  covers more than half of the candidate's area), the image resized (bicubic, aspect not kept) to
  (nw*768, nh*768) and cut row-major;
- pixels ``(x/255 - 0.5) / 0.5`` in float32;
- ids: BOS, then each text piece between ``<image>`` tags tokenized on its own (no special tokens)
  and each image as ``g*g + 1 + nw*nh*l*l`` ``<image>`` ids (g = 16, l = 12; no tiles: ``g*g + 1``).
  The prompt is plain: no role tags, no template (``<image>\\nFree OCR.``).

Where transformers' ``DeepseekOcr2Processor`` differs we follow the official code (docs/parity.md):
it adds no BOS, sizes the global view as ``round(side * 1024 / longest)`` and pads at
``(free // 2)`` where Pillow's ``pad`` uses ``round(free * 0.5)`` (banker's rounding), so a few
sizes differ from it by one pixel row. Images are EXIF-transposed and transparent pixels composited
on white before RGB, as the official OCR loaders do.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageOps

from ..errors import InputError
from .images import load_image
from .processor import Batch
from .tiling import normalize, pad_to
from .tokenizer import Tokenizer

IMAGE_TOKEN = "<image>"
PROMPTS = {
    "markdown": "<image>\n<|grounding|>Convert the document to markdown.",
    "free": "<image>\nFree OCR.",
}


@dataclass
class OCR2Images:
    """The pixels of a batch: every image's global view, and every local tile, in batch-row order."""

    global_views: torch.Tensor  # (images, 3, S, S) float32
    tiles: torch.Tensor  # (tiles, 3, s, s) float32; zero rows when no image was cropped

    @property
    def dtype(self) -> torch.dtype:
        return self.global_views.dtype

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "OCR2Images":
        return OCR2Images(self.global_views.to(device=device, dtype=dtype or self.global_views.dtype),
                          self.tiles.to(device=device, dtype=dtype or self.tiles.dtype))


def num_image_tokens(nw: int, nh: int, global_grid: int, local_grid: int) -> int:
    """``<image>`` positions of one image: the global grid, one separator, then the tiles' grids."""
    tiles = nw * nh if nw * nh > 1 else 0
    return global_grid * global_grid + 1 + tiles * local_grid * local_grid


def crop_grid(width: int, height: int, tile_size: int, min_crops: int = 2, max_crops: int = 6) -> tuple[int, int]:
    """(tiles across, tiles down) of the official ``find_closest_aspect_ratio`` over 2..6 tiles.

    The candidates are iterated in the official order: a Python set of (i, j) sorted (stably) by
    i*j, so equal products keep the set's order; that order decides exact ties.
    """
    ratios = {(i, j) for n in range(min_crops, max_crops + 1) for i in range(1, n + 1) for j in range(1, n + 1)
              if min_crops <= i * j <= max_crops}
    aspect = width / height
    area = width * height
    best, best_diff = (1, 1), float("inf")
    for i, j in sorted(ratios, key=lambda r: r[0] * r[1]):
        diff = abs(aspect - i / j)
        if diff < best_diff:
            best, best_diff = (i, j), diff
        elif diff == best_diff and area > 0.5 * tile_size * tile_size * i * j:
            best = (i, j)
    return best


def load_document_image(source: str | Path | Image.Image) -> Image.Image:
    """RGB image: EXIF orientation applied, transparency composited on white."""
    if isinstance(source, Image.Image):
        image = source
    else:
        image = load_image_raw(source)
    image = ImageOps.exif_transpose(image)
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, rgba)
    return load_image(image)


def load_image_raw(path: str | Path) -> Image.Image:
    """The decoded file in its own mode (``load_image`` checks and names a bad file)."""
    load_image(path)  # raises InputError naming the file when it cannot be read
    with Image.open(path) as img:
        img.load()
        return img.copy()


@dataclass(frozen=True)
class OCR2ProcessorConfig:
    """What the official processor hard-codes; sizes come from the model's ``vision_config``."""

    image_size: int = 1024
    tile_size: int = 768
    global_grid: int = 16
    local_grid: int = 12
    min_crops: int = 2
    max_crops: int = 6
    crop: bool = True  # CROP_MODE
    add_bos: bool = True  # official scripts: bos=True (transformers' processor adds none)
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)

    @classmethod
    def from_model_config(cls, cfg: Any) -> "OCR2ProcessorConfig":
        v = cfg.vision_config
        return cls(image_size=v.image_size, tile_size=v.tile_size, global_grid=v.global_grid, local_grid=v.local_grid)


class OCR2Processor:
    """Plain prompts with ``<image>`` tags + images -> a left-padded :class:`Batch` with :class:`OCR2Images`."""

    load_image = staticmethod(load_document_image)  # how the pipeline opens images for this processor

    def __init__(self, tokenizer: Tokenizer, config: OCR2ProcessorConfig | None = None) -> None:
        self.tokenizer = tokenizer
        self.config = config or OCR2ProcessorConfig()
        self.image_id = tokenizer.token_id(IMAGE_TOKEN)
        self.pad_color = tuple(int(m * 255) for m in self.config.image_mean)

    @classmethod
    def from_pretrained(cls, model_dir: str | Path, model_config: Any) -> "OCR2Processor":
        return cls(Tokenizer.from_dir(model_dir), OCR2ProcessorConfig.from_model_config(model_config))

    # ---- images ------------------------------------------------------------------------------
    def views(self, image: Image.Image) -> tuple[Image.Image, list[Image.Image], tuple[int, int]]:
        """(global view, local tiles row-major, (nw, nh)); (1, 1) and no tiles when not cropped."""
        c = self.config
        w, h = image.size
        tiles: list[Image.Image] = []
        grid = (1, 1)
        if c.crop and (w > c.tile_size or h > c.tile_size):
            grid = crop_grid(w, h, c.tile_size, c.min_crops, c.max_crops)
            nw, nh = grid
            canvas = image.resize((nw * c.tile_size, nh * c.tile_size), resample=Image.Resampling.BICUBIC)
            s = c.tile_size
            tiles = [canvas.crop((x * s, y * s, (x + 1) * s, (y + 1) * s)) for y in range(nh) for x in range(nw)]
        return pad_to(image, (c.image_size, c.image_size), self.pad_color), tiles, grid

    def image_token_count(self, width: int, height: int) -> int:
        c = self.config
        nw, nh = crop_grid(width, height, c.tile_size, c.min_crops, c.max_crops) \
            if c.crop and max(width, height) > c.tile_size else (1, 1)
        return num_image_tokens(nw, nh, c.global_grid, c.local_grid)

    # ---- prompts -----------------------------------------------------------------------------
    def encode_prompt(self, prompt: str, images: Sequence[Image.Image]):
        """ids, image mask, global views, tiles and (nw, nh) per image for one plain prompt."""
        pieces = prompt.split(IMAGE_TOKEN)
        if len(pieces) - 1 != len(images):
            raise InputError(f"the prompt has {len(pieces) - 1} {IMAGE_TOKEN} tags but {len(images)} image(s) were given")
        ids = [self.tokenizer.bos_id] if self.config.add_bos else []
        mask = [False] * len(ids)
        globals_, tiles, grids = [], [], []
        for piece, image in zip(pieces, images):
            text = self.tokenizer.encode(piece)
            ids += text
            mask += [False] * len(text)
            glob, local, grid = self.views(image)
            globals_.append(glob)
            tiles += local
            grids.append(list(grid))
            n = num_image_tokens(*grid, self.config.global_grid, self.config.local_grid)
            ids += [self.image_id] * n
            mask += [True] * n
        text = self.tokenizer.encode(pieces[-1])
        return ids + text, mask + [False] * len(text), globals_, tiles, grids

    def prompt_of(self, conversation: Sequence[dict[str, Any]], where: str) -> tuple[str, list[Image.Image]]:
        """The plain prompt of a one-user-turn conversation (the format has no roles)."""
        users = [m for m in conversation if m.get("role") in ("user", "<|User|>")]
        if len(users) != 1 or len(conversation) != 1:
            raise InputError(f"{where}DeepSeek-OCR 2 takes one plain prompt (one user message), "
                             f"got {len(conversation)} message(s)")
        content = users[0].get("content", "")
        if not isinstance(content, str):
            raise InputError(f"{where}message content must be a str, got {type(content).__name__}")
        return content, [load_document_image(x) for x in users[0].get("images") or []]

    def __call__(self, conversations: Sequence[Any], images: Sequence[Any] | None = None, *,
                 max_length: int | None = None, **_: Any) -> Batch:
        """A plain prompt string, a one-message conversation, or a list of either."""
        if isinstance(conversations, str) or (conversations and isinstance(conversations[0], dict)):
            conversations = [conversations]
        rows = []
        for index, conv in enumerate(conversations):
            where = f"conversation {index}: " if len(conversations) > 1 else ""
            if isinstance(conv, str):
                prompt, imgs = conv, [load_document_image(x) for x in (images or [])]
            else:
                prompt, imgs = self.prompt_of(conv, where)
            row = self.encode_prompt(prompt, imgs)
            if max_length is not None and len(row[0]) > max_length:
                raise InputError(f"{where}the prompt is {len(row[0])} tokens, longer than max_length {max_length}")
            rows.append(row)
        return self._collate(rows)

    def _collate(self, rows: list) -> Batch:
        b, length = len(rows), max(len(r[0]) for r in rows)
        max_images = max(1, max(len(r[4]) for r in rows))
        input_ids = torch.full((b, length), self.tokenizer.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((b, length), dtype=torch.bool)
        seq_mask = torch.zeros((b, length), dtype=torch.bool)
        crops = torch.zeros((b, max_images, 2), dtype=torch.long)
        globals_, tiles, counts = [], [], []
        for i, (ids, mask, glob, local, grids) in enumerate(rows):
            start = length - len(ids)
            input_ids[i, start:] = torch.tensor(ids, dtype=torch.long)
            attention_mask[i, start:] = True
            seq_mask[i, start:] = torch.tensor(mask, dtype=torch.bool)
            if grids:
                crops[i, :len(grids)] = torch.tensor(grids, dtype=torch.long)
            globals_ += glob
            tiles += local
            counts.append([num_image_tokens(nw, nh, self.config.global_grid, self.config.local_grid)
                           for nw, nh in grids])
        c = self.config
        mean, std = c.image_mean, c.image_std
        pixels = OCR2Images(
            normalize(globals_, mean, std) if globals_ else torch.zeros(0, 3, c.image_size, c.image_size),
            normalize(tiles, mean, std) if tiles else torch.zeros(0, 3, c.tile_size, c.tile_size),
        )
        return Batch(input_ids=input_ids, attention_mask=attention_mask, images=pixels,  # type: ignore[arg-type]
                     images_seq_mask=seq_mask, images_spatial_crop=crops, num_image_tokens=counts,
                     sft_format=[""] * b)
