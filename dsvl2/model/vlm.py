"""DSVL2: tiles -> ViT -> projector -> 2D tile layout -> splice into the text embeddings -> LM.

Reproduces ``DeepseekVLV2ForCausalLM.prepare_inputs_embeds`` (spec §4, §10). Per image: the global
view as a g x g grid with a learned ``image_newline`` closing every row, one ``view_separator``, then
the local tiles stitched into a (nh*g) x (nw*g) canvas, again with a newline per row (``global_view_pos
= "tail"`` swaps the two views). All tiles of the batch go through the ViT as one batch; the image
vectors of each row are written, in order, where ``images_seq_mask`` is True. The count must equal
``processing.layout.num_image_tokens`` for every image, which is asserted.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import DSVL2Config
from ..errors import InputError
from ..processing.layout import num_image_tokens
from .llm import CausalLM, causal_mask
from .projector import Projector
from .vision import VisionTower


class DSVL2(nn.Module):
    def __init__(self, cfg: DSVL2Config):
        super().__init__()
        self.cfg = cfg
        d = cfg.projector_config.n_embed
        self.vision = VisionTower(cfg.vision_config)
        self.projector = Projector(cfg.projector_config)
        self.image_newline = nn.Parameter(torch.zeros(d))
        self.view_separator = nn.Parameter(torch.zeros(d))  # checkpoint key: "view_seperator" (sic)
        self.language = CausalLM(cfg.language_config)
        self.vision_chunk_size: int | None = None

    @property
    def dtype(self) -> torch.dtype:
        return self.language.lm_head.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.language.lm_head.weight.device

    # ---- images ---------------------------------------------------------------------------------
    @staticmethod
    def image_grids(images_spatial_crop: torch.Tensor) -> list[list[tuple[int, int]]]:
        """(B, max_images, 2) crops -> per row the (nw, nh) of each image; a zero entry ends the row."""
        grids = []
        for row in images_spatial_crop.tolist():
            items = []
            for nw, nh in row:
                if nw == 0 or nh == 0:
                    break
                items.append((int(nw), int(nh)))
            grids.append(items)
        return grids

    def encode_tiles(self, tiles: torch.Tensor) -> torch.Tensor:
        """tiles (N, 3, S, S) -> projected tokens (N, g*g, D)."""
        feats = self.vision(tiles.to(self.dtype), chunk_size=self.vision_chunk_size)
        return self.projector(feats)

    def layout_image(self, tokens: torch.Tensor, nw: int, nh: int) -> torch.Tensor:
        """tokens (1 + nw*nh, g*g, D) of one image -> its sequence of vectors (spec §4.2)."""
        n, gg, d = tokens.shape
        g = int(round(gg ** 0.5))
        glob = tokens[0].view(g, g, d)
        glob = torch.cat([glob, self.image_newline.view(1, 1, d).expand(g, 1, d)], dim=1).view(-1, d)  # (g*(g+1), D)
        local = tokens[1:].view(nh, nw, g, g, d).permute(0, 2, 1, 3, 4).reshape(nh * g, nw * g, d)  # canvas
        local = torch.cat([local, self.image_newline.view(1, 1, d).expand(nh * g, 1, d)], dim=1).view(-1, d)
        sep = self.view_separator.view(1, d)
        if self.cfg.global_view_pos == "head":
            return torch.cat([glob, sep, local], dim=0)
        return torch.cat([local, sep, glob], dim=0)

    def prepare_inputs_embeds(self, input_ids: torch.Tensor, images: torch.Tensor | None = None,
                              images_seq_mask: torch.Tensor | None = None,
                              images_spatial_crop: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings with every image's vectors written at its ``<image>`` positions."""
        embeds = self.language.model.embed_tokens(input_ids)  # (B, T, D)
        if images is None or images_spatial_crop is None or int(images_spatial_crop.sum()) == 0:
            return embeds
        grids = self.image_grids(images_spatial_crop)
        for b, row in enumerate(grids):  # user input: the model's own layout is asserted below
            need = sum(1 + nw * nh for nw, nh in row)
            if any(nw < 0 or nh < 0 for nw, nh in row) or need > images.shape[1]:
                raise InputError(f"batch row {b}: images_spatial_crop {row} needs {need} tiles (one global + "
                                 f"nw*nh local per image, no negative counts) but images holds {images.shape[1]}")
        tiles = [images[b, : sum(1 + nw * nh for nw, nh in row)] for b, row in enumerate(grids)]
        tokens = self.encode_tiles(torch.cat(tiles, dim=0))  # (N, g*g, D)
        grid = self.cfg.grid
        start = 0
        rows: list[list[torch.Tensor]] = []
        for row in grids:
            pieces = []
            for nw, nh in row:
                piece = self.layout_image(tokens[start:start + 1 + nw * nh], nw, nh)
                start += 1 + nw * nh
                assert piece.shape[0] == num_image_tokens(nw, nh, grid), "layout disagrees with processing.layout"
                pieces.append(piece)
            rows.append(pieces)
        return splice_images(embeds, rows, images_seq_mask)

    # ---- full forward (training, scoring) --------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                images: torch.Tensor | None = None, images_seq_mask: torch.Tensor | None = None,
                images_spatial_crop: torch.Tensor | None = None, positions: torch.Tensor | None = None,
                mask: torch.Tensor | None = None, expanded: bool = False) -> torch.Tensor:
        """Logits (B, T, V) in fp32 for a whole sequence, no cache.

        ``positions``/``mask`` may be given for packed sequences (block-diagonal masks); otherwise they
        come from ``attention_mask`` as in generation.
        """
        embeds = self.prepare_inputs_embeds(input_ids, images, images_seq_mask, images_spatial_crop)
        b, t = input_ids.shape
        if attention_mask is None:
            attention_mask = torch.ones(b, t, dtype=torch.bool, device=input_ids.device)
        if positions is None:
            positions = positions_from_mask(attention_mask)
        if mask is None:
            mask = causal_mask(attention_mask, 0, t, embeds.dtype)
        hidden = self.language.model(embeds, positions, mask, None, expanded)
        return self.language.logits(hidden)


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """``cumsum(mask) - 1`` with pads at 1, as transformers' generate (left padding safe)."""
    pos = attention_mask.long().cumsum(-1) - 1
    return pos.masked_fill(~attention_mask.bool(), 1)


def splice_images(embeds: torch.Tensor, pieces: list[list[torch.Tensor]],
                  images_seq_mask: torch.Tensor | None) -> torch.Tensor:
    """``embeds`` (B, T, D) with row b's image vectors ``pieces[b]`` (one (n_i, D) tensor per image, in
    order) written at its ``<image>`` positions; the position count must equal the vectors' count."""
    rows = []
    for b, row in enumerate(pieces):
        if not row:
            rows.append(embeds[b])
            continue
        vectors = torch.cat(row, dim=0)
        mask = images_seq_mask[b].bool()
        if int(mask.sum()) != vectors.shape[0]:
            sizes = [int(v.shape[0]) for v in row]
            raise InputError(f"batch row {b}: {int(mask.sum())} image positions in images_seq_mask but its images "
                             f"need {vectors.shape[0]} vectors ({sizes})")
        rows.append(embeds[b].masked_scatter(mask.unsqueeze(-1), vectors.to(embeds.dtype)))
    return torch.stack(rows, dim=0)
