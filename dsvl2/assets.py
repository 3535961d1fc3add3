"""Where the files shipped inside the package live; nothing heavy is imported here.

The pipeline and the CLI ask this module for the default model directory, so that no layer below the
demo application imports :mod:`dsvl2.demo` (which builds on training and evaluation).
"""

from pathlib import Path

from .errors import DSVL2Error

MODEL_DIR = Path(__file__).resolve().parent / "demo" / "model"


def default_model_dir() -> Path:
    """The demo model shipped inside the package (used when no ``--model`` is given)."""
    if not (MODEL_DIR / "config.json").is_file():
        raise DSVL2Error(
            f"no model given and the shipped demo model is missing at {MODEL_DIR}; pass --model DIR "
            "(a DeepSeek-VL2 checkpoint in the Hugging Face layout) or rebuild the demo with `make demo-model`"
        )
    return MODEL_DIR
