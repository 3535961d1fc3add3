"""DeepSeek-OCR 2: the deepencoderv2 vision side + a linear projector in front of our language model.

Reproduces ``DeepseekOCR2ForCausalLM`` of the official ``DeepSeek-OCR2-vllm/deepseek_ocr2.py``
(``_pixel_values_to_embedding``, ``get_input_embeddings``). Per image, the global view (``image_size``
px, padded) and its local tiles (``tile_size`` px, when the image was cropped) each go through SAM,
the query encoder and the projector; the image's vectors are, in this order: every tile's query
outputs (tiles in row-major order, each tile's queries in order), the global view's, then one
``view_separator``. No newline vectors (the official code has them commented out) and
``global_view_pos`` is not consulted. They are written where ``images_seq_mask`` is True, whose count
per image must equal :func:`~dsvl2.processing.ocr2.num_image_tokens` (asserted).

The language model, caches and generation are the DeepSeek-VL2 ones, unchanged: this class offers the
same ``prepare_inputs_embeds`` / ``forward`` / ``language`` surface as :class:`~dsvl2.model.vlm.DSVL2`.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config_ocr2 import LinearProjectorConfig, OCR2Config
from ..errors import InputError
from ..processing.ocr2 import OCR2Images, num_image_tokens
from .llm import CausalLM
from .ocr2_vision import build_encoders
from .vlm import DSVL2, splice_images


class LinearProjector(nn.Module):
    """``projector.layers``: one linear map from the query encoder's width to the language model's."""

    def __init__(self, cfg: LinearProjectorConfig):
        super().__init__()
        self.layers = nn.Linear(cfg.input_dim, cfg.n_embed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class DeepseekOCR2(nn.Module):
    def __init__(self, cfg: OCR2Config):
        super().__init__()
        self.cfg = cfg
        self.sam_model, self.qwen2_model = build_encoders(cfg.vision_config)
        self.projector = LinearProjector(cfg.projector_config)
        self.view_separator = nn.Parameter(torch.zeros(cfg.projector_config.n_embed))  # key: view_seperator
        self.language = CausalLM(cfg.language_config)
        self.vision_chunk_size: int | None = None  # views per vision call (None: all at once)

    dtype = DSVL2.dtype
    device = DSVL2.device
    image_grids = staticmethod(DSVL2.image_grids)
    forward = DSVL2.forward  # same surface: embeddings with images spliced in, then the language model

    def reset_buffers_(self, device: torch.device | str) -> None:
        """Rebuild the non-persistent RoPE buffers on ``device`` (after a ``meta``-device build)."""
        self.language.model.rotary.reset_(device)
        self.qwen2_model.rotary.reset_(device)

    def encode_views(self, pixels: torch.Tensor, is_global: bool) -> torch.Tensor:
        """views (N, 3, S, S) -> projected query outputs (N, Q, D)."""
        cfg = self.cfg.vision_config
        size = cfg.image_size if is_global else cfg.tile_size
        if pixels.dim() != 4 or tuple(pixels.shape[1:]) != (3, size, size):
            kind = "global views" if is_global else "tiles"
            raise InputError(f"DeepSeek-OCR 2 expects {kind} of shape (N, 3, {size}, {size}), got {tuple(pixels.shape)}")
        step = self.vision_chunk_size or max(1, pixels.shape[0])
        outs = []
        for chunk in pixels.split(step):
            feats = self.sam_model(chunk.to(self.dtype))  # (n, dim, g, g)
            outs.append(self.projector(self.qwen2_model(feats.flatten(2).transpose(1, 2), is_global)))
        return torch.cat(outs, dim=0)

    def image_vectors(self, images: OCR2Images, images_spatial_crop: torch.Tensor) -> list[list[torch.Tensor]]:
        """Per batch row, the vector sequence of each image (tiles, global view, separator)."""
        grids = self.image_grids(images_spatial_crop)
        n_images = sum(len(row) for row in grids)
        n_tiles = sum(nw * nh for row in grids for nw, nh in row if nw * nh > 1)
        if images.global_views.shape[0] != n_images or images.tiles.shape[0] != n_tiles:
            raise InputError(f"images_spatial_crop describes {n_images} image(s) with {n_tiles} tile(s), but "
                             f"{images.global_views.shape[0]} global view(s) and {images.tiles.shape[0]} tile(s) "
                             "were given")
        glob = self.encode_views(images.global_views, is_global=True)  # (images, Qg, D)
        local = self.encode_views(images.tiles, is_global=False) if n_tiles else None  # (tiles, Ql, D)
        d = glob.shape[-1]
        sep = self.view_separator.view(1, d).to(glob.dtype)
        vc = self.cfg.vision_config
        out, i, j = [], 0, 0
        for row in grids:
            pieces = []
            for nw, nh in row:
                parts = []
                if nw * nh > 1:
                    parts.append(local[j:j + nw * nh].reshape(-1, d))
                    j += nw * nh
                parts += [glob[i], sep]
                i += 1
                vectors = torch.cat(parts, dim=0)
                assert vectors.shape[0] == num_image_tokens(nw, nh, vc.global_grid, vc.local_grid), \
                    "layout disagrees with processing.ocr2.num_image_tokens"
                pieces.append(vectors)
            out.append(pieces)
        return out

    def prepare_inputs_embeds(self, input_ids: torch.Tensor, images: OCR2Images | None = None,
                              images_seq_mask: torch.Tensor | None = None,
                              images_spatial_crop: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings with every image's vectors written at its ``<image>`` positions."""
        embeds = self.language.model.embed_tokens(input_ids)  # (B, T, D)
        if images is None or images_spatial_crop is None or int(images_spatial_crop.sum()) == 0:
            return embeds
        if not isinstance(images, OCR2Images):
            raise InputError(f"DeepSeek-OCR 2 takes OCR2Images (global views + tiles), got {type(images).__name__}")
        return splice_images(embeds, self.image_vectors(images, images_spatial_crop), images_seq_mask)
