"""Conversation + images -> model inputs, exactly as the official DeepSeek-VL2 processor.

Reproduces ``DeepseekVLV2Processor`` of the official
``deepseek_vl2/models/processing_deepseek_vl_v2.py``: ``format_messages_v2``,
``tokenize_with_images``, ``process_one`` and ``batchify`` (spec sections 5, 6.3-6.5). Image
tiling lives in :mod:`.tiling`, token counts in :mod:`.layout`, the display template in
:mod:`.template`.

Departures, all deliberate: ``images_seq_mask`` stays boolean after padding (spec P9); bad input
raises :class:`~dsvl2.errors.InputError` naming the count or limit instead of an ``assert``.
"""

import json
from collections.abc import Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from dsvl2.errors import ConfigError, InputError
from dsvl2.processing.budget import allocate_resolutions
from dsvl2.processing.images import load_image
from dsvl2.processing.layout import num_image_tokens, tile_grid
from dsvl2.processing.template import ASSISTANT_ROLE, USER_ROLE, normalize_role, render, sft_format
from dsvl2.processing.tiling import normalize, select_best_resolution, tile_image
from dsvl2.processing.tokenizer import PAD_TOKEN, Tokenizer

ImageLike = str | Path | Image.Image
Message = dict[str, Any]

# all (m*384, n*384) with m*n <= 9, in the shipped order (the order breaks ties)
DEFAULT_CANDIDATE_RESOLUTIONS: tuple[tuple[int, int], ...] = (
    (384, 384), (384, 768), (768, 384), (384, 1152), (1152, 384), (384, 1536), (1536, 384),
    (768, 768), (384, 1920), (1920, 384), (384, 2304), (2304, 384), (768, 1152), (1152, 768),
    (384, 2688), (2688, 384), (384, 3072), (3072, 384), (768, 1536), (1536, 768), (384, 3456),
    (3456, 384), (1152, 1152),
)  # fmt: skip


@dataclass(frozen=True)
class ProcessorConfig:
    """``processor_config.json`` under the official key names; defaults are the spec's (section 13)."""

    candidate_resolutions: tuple[tuple[int, int], ...] = DEFAULT_CANDIDATE_RESOLUTIONS
    patch_size: int = 14
    downsample_ratio: int = 2
    image_mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    image_std: tuple[float, ...] = (0.5, 0.5, 0.5)
    normalize: bool = True
    image_token: str = "<image>"
    pad_token: str = PAD_TOKEN
    add_special_token: bool = False  # stored by the official processor, never used
    sft_format: str = "deepseek"
    mask_prompt: bool = True  # official code default; the golden checkpoints ship false
    ignore_id: int = -100

    def __post_init__(self) -> None:
        res = tuple(tuple(int(v) for v in pair) for pair in self.candidate_resolutions)
        object.__setattr__(self, "candidate_resolutions", res)
        object.__setattr__(self, "image_mean", tuple(float(v) for v in self.image_mean))
        object.__setattr__(self, "image_std", tuple(float(v) for v in self.image_std))
        if not res or any(len(pair) != 2 for pair in res):
            raise ConfigError(f"candidate_resolutions must be a non-empty list of [width, height], got {res}")
        size = res[0][0]
        for w, h in res:
            if w <= 0 or h <= 0 or w % size or h % size:
                raise ConfigError(
                    f"candidate_resolutions entry [{w}, {h}] is not a positive multiple of the tile size {size}"
                )
        if self.patch_size <= 0 or self.downsample_ratio <= 0:
            raise ConfigError(
                f"patch_size ({self.patch_size}) and downsample_ratio ({self.downsample_ratio}) must be positive"
            )
        if len(self.image_mean) != 3 or len(self.image_std) != 3 or 0.0 in self.image_std:
            raise ConfigError(
                f"image_mean / image_std need 3 values, std non-zero: {self.image_mean}, {self.image_std}"
            )
        if self.sft_format != "deepseek":
            raise ConfigError(f"sft_format {self.sft_format!r} is not supported; only 'deepseek' is used by VL2")

    @property
    def image_size(self) -> int:
        """Tile side in pixels: ``candidate_resolutions[0][0]`` (384 for the released models)."""
        return self.candidate_resolutions[0][0]

    @classmethod
    def from_json(cls, path: str | Path) -> "ProcessorConfig":
        """Read ``processor_config.json``; an unknown key raises :class:`ConfigError` naming it."""
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot read processor config {path}: {exc}") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"processor config {path} must hold a JSON object")
        known = {f.name for f in fields(cls)}
        data = {k: v for k, v in data.items() if k != "processor_class"}
        for key in data:
            if key not in known:
                raise ConfigError(f"unknown key {key!r} in processor config {path}")
        try:
            return cls(**data)
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from exc
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"bad value in processor config {path}: {exc}") from exc


@dataclass
class Batch:
    """Processor output; row ``b`` is left-padded, tiles and crops zero-padded (spec 5.7, 6.5)."""

    input_ids: torch.Tensor  # (B, T) int64
    attention_mask: torch.Tensor  # (B, T) bool, False on left padding
    images: torch.Tensor  # (B, max_tiles, 3, S, S) float32
    images_seq_mask: torch.Tensor  # (B, T) bool, True on image-token positions
    images_spatial_crop: torch.Tensor  # (B, max_images, 2) int64 (nw, nh); zero rows pad
    labels: torch.Tensor | None = None  # (B, T) int64, ignore_id where no loss
    num_image_tokens: list[list[int]] = field(default_factory=list)
    sft_format: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> "Batch":
        """A new Batch on ``device``; ``dtype`` (e.g. bfloat16) applies to ``images`` only."""
        return replace(
            self,
            input_ids=self.input_ids.to(device),
            attention_mask=self.attention_mask.to(device),
            images=self.images.to(device=device, dtype=dtype or self.images.dtype),
            images_seq_mask=self.images_seq_mask.to(device),
            images_spatial_crop=self.images_spatial_crop.to(device),
            labels=None if self.labels is None else self.labels.to(device),
        )


@dataclass
class _Sample:
    input_ids: list[int]
    labels: list[int]
    seq_mask: list[bool]
    pixels: torch.Tensor  # (N, 3, S, S)
    crops: list[list[int]]
    num_image_tokens: list[int]
    sft_format: str


class Processor:
    """Turns one conversation or a batch of conversations into a :class:`Batch`."""

    load_image = staticmethod(load_image)  # how the pipeline opens images for this processor

    def __init__(self, tokenizer: Tokenizer, config: ProcessorConfig | None = None) -> None:
        self.tokenizer = tokenizer
        self.config = config or ProcessorConfig()
        self.image_id = tokenizer.token_id(self.config.image_token)
        self.grid = tile_grid(self.config.image_size, self.config.patch_size, self.config.downsample_ratio)
        self.pad_color = tuple(int(m * 255) for m in self.config.image_mean)

    @classmethod
    def from_pretrained(cls, model_dir: str | Path) -> "Processor":
        """Load ``processor_config.json`` (spec defaults if absent) and the tokenizer of ``model_dir``."""
        model_dir = Path(model_dir)
        path = model_dir / "processor_config.json"
        config = ProcessorConfig.from_json(path) if path.is_file() else ProcessorConfig()
        return cls(Tokenizer.from_dir(model_dir, default_pad_token=config.pad_token), config)

    def resolutions(self, sizes: Sequence[tuple[int, int]], image_token_budget: int | None = None,
                    ) -> list[tuple[int, int]]:
        """Local-canvas resolution of each image of one conversation: the official rule (tiling only
        for <= 2 images), or the budget's allocation (:mod:`dsvl2.processing.budget`)."""
        size = self.config.image_size
        if image_token_budget is not None:
            return allocate_resolutions(sizes, self.config.candidate_resolutions, size, self.grid, image_token_budget)
        if len(sizes) <= 2:
            return [select_best_resolution(s, self.config.candidate_resolutions) for s in sizes]
        return [(size, size)] * len(sizes)

    def image_token_count(self, width: int, height: int, n_images_in_conversation: int = 1) -> int:
        """``<image>`` positions of a ``width x height`` image in a conversation with that many images."""
        if n_images_in_conversation <= 2:
            best_w, best_h = select_best_resolution((width, height), self.config.candidate_resolutions)
        else:
            best_w = best_h = self.config.image_size
        size = self.config.image_size
        return num_image_tokens(best_w // size, best_h // size, self.grid)

    def __call__(
        self,
        conversations: Sequence[Message] | Sequence[Sequence[Message]],
        images: Sequence[ImageLike] | Sequence[Sequence[ImageLike]] | None = None,
        *,
        inference: bool = True,
        mask_prompt: bool | None = None,
        max_length: int | None = None,
        system_prompt: str = "",
        image_token_budget: int | None = None,
    ) -> Batch:
        """Process one conversation (a list of messages) or a batch (a list of such lists).

        ``images`` replaces the messages' own ``"images"``: a flat list for one conversation, a
        list of lists for a batch. With ``inference`` an empty assistant turn is appended when
        the conversation does not end with an assistant message, and the final EOS is dropped;
        otherwise ``labels`` are built (``mask_prompt`` defaults to the config's value).
        ``image_token_budget``: choose each conversation's tile layouts to fit that many image tokens
        (:mod:`dsvl2.processing.budget`) instead of the official rule.
        """
        if isinstance(conversations, (str, bytes)) or not isinstance(conversations, Sequence) or not conversations:
            raise InputError("conversations must be a non-empty list of messages or a list of conversations")
        single = isinstance(conversations[0], dict)
        convs = [conversations] if single else list(conversations)
        if images is None:
            per_conv: list[Sequence[ImageLike] | None] = [None] * len(convs)
        elif single:
            per_conv = [images]
        else:
            if len(images) != len(convs):
                raise InputError(f"images has {len(images)} entries for a batch of {len(convs)} conversations")
            per_conv = list(images)
        mask = self.config.mask_prompt if mask_prompt is None else mask_prompt
        samples = []
        for index, (conv, imgs) in enumerate(zip(convs, per_conv)):
            where = "" if single else f"conversation {index}: "
            sample = self._process_one(conv, imgs, inference, mask, system_prompt, where, image_token_budget)
            if max_length is not None and len(sample.input_ids) > max_length:
                raise InputError(
                    f"{where}the prompt is {len(sample.input_ids)} tokens, longer than max_length {max_length}"
                )
            samples.append(sample)
        return self._collate(samples, with_labels=not inference)

    def _process_one(
        self,
        conversation: Sequence[Message],
        images: Sequence[ImageLike] | None,
        inference: bool,
        mask_prompt: bool,
        system_prompt: str,
        where: str,
        image_token_budget: int | None = None,
    ) -> _Sample:
        """``process_one`` of the official processor for one conversation."""
        messages = self._check_messages(conversation, where)
        if images is not None and any(m.get("images") for m in messages):
            raise InputError(f"{where}give images either per message or through images=, not both")
        sources = list(images) if images is not None else [p for m in messages for p in m.get("images") or []]
        if inference and normalize_role(messages[-1]["role"]) != "assistant":
            messages.append({"role": ASSISTANT_ROLE, "content": ""})
        token = self.config.image_token
        n_tags = sum(m["content"].count(token) for m in messages)
        if n_tags != len(sources):
            raise InputError(f"{where}the text has {n_tags} {token} placeholders but {len(sources)} images were given")
        pil_images = [load_image(src) for src in sources]
        # tiling only with <= 2 images over the whole conversation (spec 5.2), unless a budget decides
        resolutions = self.resolutions([im.size for im in pil_images], image_token_budget)

        tok = self.tokenizer
        ids, labels, seq_mask = [tok.bos_id], [tok.bos_id], [False]
        tiles: list[Image.Image] = []
        crops: list[list[int]] = []
        counts: list[int] = []
        next_image = 0
        for k, message in enumerate(messages):
            kind = normalize_role(message["role"])
            content = message["content"].strip()
            if kind == "user":
                text = render([(USER_ROLE, content), (ASSISTANT_ROLE, "")])
                n = text.count(token)
                piece_ids, piece_mask = self._tokenize_with_images(
                    text, pil_images[next_image : next_image + n], resolutions[next_image : next_image + n],
                    tiles, crops, counts
                )
                next_image += n
                labels += [self.config.ignore_id] * len(piece_ids) if mask_prompt else piece_ids
            elif kind == "assistant":
                if token in content:
                    raise InputError(f"{where}message {k} (assistant) contains {token}; images belong to user turns")
                piece_ids = tok.encode(content) + [tok.eos_id]
                piece_mask = [False] * len(piece_ids)
                labels += piece_ids
            else:
                if k != 0:
                    raise InputError(f"{where}a system message may only come first, found one at message {k}")
                if token in content:
                    raise InputError(f"{where}message {k} (system) contains {token}; images belong to user turns")
                piece_ids = tok.encode(content)
                piece_mask = [False] * len(piece_ids)
                labels += [self.config.ignore_id] * len(piece_ids) if mask_prompt else piece_ids
            ids += piece_ids
            seq_mask += piece_mask

        labels = [self.config.ignore_id if i == self.image_id else lab for i, lab in zip(ids, labels)]
        if inference:  # the empty assistant turn contributed only its EOS; the model writes the rest
            ids, labels, seq_mask = ids[:-1], labels[:-1], seq_mask[:-1]

        size = self.config.image_size
        if tiles:
            mean, std = (self.config.image_mean, self.config.image_std) if self.config.normalize else (None, None)
            pixels = normalize(tiles, mean, std)
        else:  # text-only: one all-zero tile and an all-zero crop row, as the official processor
            pixels = torch.zeros((1, 3, size, size), dtype=torch.float32)
            crops = [[0, 0]]
        display = sft_format(messages, system_prompt, tok.eos_token)
        return _Sample(ids, labels, seq_mask, pixels, crops, counts, display)

    def _check_messages(self, conversation: Sequence[Message], where: str) -> list[Message]:
        if not isinstance(conversation, Sequence) or not conversation:
            raise InputError(f"{where}a conversation must be a non-empty list of message dicts")
        messages = []
        for k, message in enumerate(conversation):
            if not isinstance(message, dict) or "role" not in message:
                raise InputError(f"{where}message {k} must be a dict with 'role' and 'content'")
            content = message.get("content", "")
            if not isinstance(content, str):
                raise InputError(f"{where}message {k} content must be a str, got {type(content).__name__}")
            normalize_role(message["role"])
            messages.append({**message, "content": content})
        return messages

    def _tokenize_with_images(
        self,
        text: str,
        images: list[Image.Image],
        resolutions: list[tuple[int, int]],
        tiles: list[Image.Image],
        crops: list[list[int]],
        counts: list[int],
    ) -> tuple[list[int], list[bool]]:
        """Official ``tokenize_with_images``: text pieces between images are encoded separately,
        each image becomes a block of ``<image>`` ids. Appends tiles / crops / counts in place."""
        pieces = text.split(self.config.image_token)
        ids: list[int] = []
        mask: list[bool] = []
        for piece, image, resolution in zip(pieces, images, resolutions):
            piece_ids = self.tokenizer.encode(piece)
            ids += piece_ids
            mask += [False] * len(piece_ids)
            image_tiles, nw, nh = tile_image(
                image, self.config.candidate_resolutions, self.config.image_size, True, self.pad_color, resolution
            )
            tiles += image_tiles
            crops.append([nw, nh])
            n = num_image_tokens(nw, nh, self.grid)
            counts.append(n)
            ids += [self.image_id] * n
            mask += [True] * n
        last = self.tokenizer.encode(pieces[-1])
        return ids + last, mask + [False] * len(last)

    def _collate(self, samples: list[_Sample], with_labels: bool) -> Batch:
        """Official ``batchify`` with left padding; masks stay boolean."""
        batch, length = len(samples), max(len(s.input_ids) for s in samples)
        max_tiles = max(s.pixels.shape[0] for s in samples)
        max_images = max(len(s.crops) for s in samples)
        size = self.config.image_size
        pad, ignore = self.tokenizer.pad_id, self.config.ignore_id
        input_ids = torch.full((batch, length), pad, dtype=torch.long)
        attention_mask = torch.zeros((batch, length), dtype=torch.bool)
        seq_mask = torch.zeros((batch, length), dtype=torch.bool)
        labels = torch.full((batch, length), ignore, dtype=torch.long)
        pixels = torch.zeros((batch, max_tiles, 3, size, size), dtype=torch.float32)
        crops = torch.zeros((batch, max_images, 2), dtype=torch.long)
        for b, s in enumerate(samples):
            start = length - len(s.input_ids)
            input_ids[b, start:] = torch.tensor(s.input_ids, dtype=torch.long)
            attention_mask[b, start:] = True
            seq_mask[b, start:] = torch.tensor(s.seq_mask, dtype=torch.bool)
            labels[b, start:] = torch.tensor(s.labels, dtype=torch.long)
            pixels[b, : s.pixels.shape[0]] = s.pixels
            crops[b, : len(s.crops)] = torch.tensor(s.crops, dtype=torch.long)
        labels[labels == pad] = ignore  # as batchify: a label equal to the pad id is never trained
        return Batch(
            input_ids=input_ids,
            attention_mask=attention_mask,
            images=pixels,
            images_seq_mask=seq_mask,
            images_spatial_crop=crops,
            labels=labels if with_labels else None,
            num_image_tokens=[s.num_image_tokens for s in samples],
            sft_format=[s.sft_format for s in samples],
        )
