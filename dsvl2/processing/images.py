"""Image loading as the official ``load_pil_images`` (``deepseek_vl2/utils/io.py``) does it.

``Image.open(path).convert("RGB")``: no EXIF transpose, alpha dropped without compositing,
palette and grayscale expanded to RGB. Unlike the official loader, a file that cannot be read
(missing, empty, truncated, not an image, zero pixels) raises :class:`~dsvl2.errors.InputError`
naming the file instead of a bare Pillow exception deep inside the processor.
"""

from pathlib import Path

from PIL import Image

from dsvl2.errors import InputError


def load_image(x: str | Path | Image.Image) -> Image.Image:
    """Return ``x`` as a fully decoded RGB Pillow image (a new object; the input is not modified)."""
    if isinstance(x, Image.Image):
        if x.width == 0 or x.height == 0:
            raise InputError(f"image has zero size ({x.width}x{x.height})")
        return x.convert("RGB")
    if not isinstance(x, (str, Path)):
        raise InputError(f"an image must be a file path or a PIL.Image, got {type(x).__name__}")
    path = Path(x)
    if not path.is_file():
        raise InputError(f"image file not found: {path}")
    if path.stat().st_size == 0:
        raise InputError(f"image file is empty (0 bytes): {path}")
    try:
        with Image.open(path) as img:
            # convert() forces the full decode, so a truncated file fails here and not later.
            rgb = img.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise InputError(f"cannot read image {path}: {exc}") from exc
    if rgb.width == 0 or rgb.height == 0:
        raise InputError(f"image has zero size ({rgb.width}x{rgb.height}): {path}")
    rgb.info["source"] = str(path)  # kept by convert(); names the image in context-limit errors
    return rgb
