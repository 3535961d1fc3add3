"""dsvl2: a fast, faithful PyTorch-native DeepSeek-VL2 (Tiny / Small / Base).

    import dsvl2
    pipe = dsvl2.load("path/to/deepseek-vl2-tiny")          # official HF layout, unchanged
    print(pipe.chat("<image>\\nWhat is in this picture?", images=["cat.png"]))
    for piece in pipe.stream("Describe it.", images=["cat.png"]):
        print(piece, end="")

Low-level pieces: :class:`DSVL2Config` / :data:`PRESETS`, :class:`DSVL2` (the model),
:class:`Processor`, :func:`generate`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "load": "dsvl2.pipeline",
    "Pipeline": "dsvl2.pipeline",
    "Completion": "dsvl2.pipeline",
    "DSVL2Config": "dsvl2.config",
    "PRESETS": "dsvl2.config",
    "DSVL2": "dsvl2.model.vlm",
    "Processor": "dsvl2.processing.processor",
    "Batch": "dsvl2.processing.processor",
    "generate": "dsvl2.generation.generate",
    "GenerateArgs": "dsvl2.generation.generate",
    "load_model": "dsvl2.checkpoint",
    "save_model": "dsvl2.checkpoint",
    "parse_grounding": "dsvl2.processing.grounding",
    "draw_boxes": "dsvl2.processing.grounding",
    "DSVL2Error": "dsvl2.errors",
}

if TYPE_CHECKING:  # pragma: no cover
    from .checkpoint import load_model, save_model
    from .config import PRESETS, DSVL2Config
    from .errors import DSVL2Error
    from .generation.generate import GenerateArgs, generate
    from .model.vlm import DSVL2
    from .pipeline import Completion, Pipeline, load
    from .processing.grounding import draw_boxes, parse_grounding
    from .processing.processor import Batch, Processor


def __getattr__(name: str) -> Any:
    """Import lazily: ``import dsvl2`` stays cheap and free of side effects."""
    if name not in _EXPORTS:
        raise AttributeError(f"module 'dsvl2' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(_EXPORTS[name]), name)


__all__ = sorted(_EXPORTS)
