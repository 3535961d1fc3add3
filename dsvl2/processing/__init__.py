"""DeepSeek-VL2 preprocessing: tiling, image-token layout, chat template, tokenizer, processor,
grounding. Reproduces ``deepseek_vl2/models/processing_deepseek_vl_v2.py`` and friends."""

from dsvl2.processing.grounding import Box, GroundingResult, parse_grounding
from dsvl2.processing.layout import num_image_tokens, tile_grid
from dsvl2.processing.processor import Batch, Processor, ProcessorConfig
from dsvl2.processing.tokenizer import StreamDecoder, Tokenizer

__all__ = [
    "Batch",
    "Box",
    "GroundingResult",
    "Processor",
    "ProcessorConfig",
    "StreamDecoder",
    "Tokenizer",
    "num_image_tokens",
    "parse_grounding",
    "tile_grid",
]
