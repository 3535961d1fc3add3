"""Grounding text: ``<|ref|>label<|/ref|><|det|>[[x1, y1, x2, y2], ...]<|/det|>``.

Reproduces the formats of spec section 9.1 and the demo's ``parse_ref_bbox`` /
drawing (official ``deepseek_vl2/serve/app_modules/utils.py``, spec 9.2) with two deliberate
changes: the parser is safe (regex + ``int``, never ``eval``) and tolerant (the demo returns
nothing when ref/det counts differ or one list is malformed; we keep every well-formed box and
report the rest in ``errors``), and labels are drawn with Pillow's default font, not simsun.ttc.

Coordinates are integers in [0, 999] relative to the ORIGINAL image; ``Box.to_pixels`` uses
``int(v / 999 * W)`` for x and ``H`` for y, as the demo (it divides by 999, not 1000). Like the
official parser (which evaluates the list as Python), non-integer and negative numbers are read
(``[[162.5, 328, 540.2, 966]]``); values outside 0-999 are clipped and reported.
"""

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from PIL import Image, ImageDraw, ImageFont

from dsvl2.errors import InputError

REF, REF_END, DET, DET_END, GROUNDING = "<|ref|>", "<|/ref|>", "<|det|>", "<|/det|>", "<|grounding|>"
_TAG = re.compile(r"<\|/?(?:ref|det)\|>")
_INNER_LIST = re.compile(r"\[([^\[\]]*)\]")
_NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)")

# the demo's BOX2COLOR, cycled per box
COLORS: tuple[tuple[int, int, int], ...] = (
    (255, 0, 0), (0, 255, 0), (0, 0, 255), (0, 255, 255), (255, 255, 0), (255, 0, 255),
    (127, 127, 127), (255, 255, 127), (255, 127, 255), (127, 255, 255), (127, 127, 255),
    (127, 255, 127), (255, 127, 127),
)  # fmt: skip


@dataclass(frozen=True)
class Box:
    """One box of a grounded answer, in the model's 0-999 coordinates."""

    label: str
    x1: float  # an int whenever the model wrote an integer (always, for the released models)
    y1: float
    x2: float
    y2: float

    def to_pixels(self, width: int, height: int) -> tuple[int, int, int, int]:
        """Pixel corners in an image of ``width x height``: ``int(v / 999 * W)`` / ``* H``."""
        return (
            int(self.x1 / 999 * width),
            int(self.y1 / 999 * height),
            int(self.x2 / 999 * width),
            int(self.y2 / 999 * height),
        )


@dataclass
class GroundingResult:
    """Boxes that parsed, and one message per problem found on the way."""

    boxes: list[Box] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def _parse_box(label: str, body: str, where: str, errors: list[str]) -> Box | None:
    parts = [p.strip() for p in body.split(",")]
    if len(parts) != 4:
        errors.append(f"{where}: expected 4 numbers, got {len(parts)} in [{body}]")
        return None
    values: list[float] = []
    for part in parts:
        if not _NUMBER.fullmatch(part):
            errors.append(f"{where}: {part!r} is not a number in [{body}]")
            return None
        v: float = int(part) if re.fullmatch(r"[+-]?\d+", part) else float(part)
        if not 0 <= v <= 999:
            errors.append(f"{where}: value {v} outside 0-999, clamped")
            v = min(max(v, 0), 999)
        values.append(v)
    x1, y1, x2, y2 = values
    if x1 > x2 or y1 > y2:
        errors.append(f"{where}: corners out of order in [{body}], swapped")
        x1, x2 = sorted((x1, x2))
        y1, y2 = sorted((y1, y2))
    return Box(label, x1, y1, x2, y2)


def _parse_det(label: str, body: str, where: str, errors: list[str]) -> list[Box]:
    """Every innermost ``[...]`` of a det body is one box; stray numbers are reported."""
    boxes = []
    for n, match in enumerate(_INNER_LIST.finditer(body)):
        box = _parse_box(label, match.group(1), f"{where} box {n}", errors)
        if box is not None:
            boxes.append(box)
    if body.count("[") != body.count("]"):
        errors.append(f"{where}: unbalanced brackets in {body.strip()!r}")
    leftover = _INNER_LIST.sub("", body)
    if re.search(r"\d", leftover):
        errors.append(f"{where}: numbers outside a complete [x1, y1, x2, y2] list in {leftover.strip()!r}")
    return boxes


def parse_grounding(text: str) -> GroundingResult:
    """Collect the boxes of every ``<|ref|>label<|/ref|>`` + following ``<|det|>...<|/det|>``.

    Never raises. A det without a ref gets label ``""``; a ref without a det, an unterminated
    tag, a list with the wrong number of values, a value that is not a number, an out-of-range
    value (clamped)
    or swapped corners (sorted) are reported in ``errors``.
    """
    result = GroundingResult()
    if not isinstance(text, str):
        result.errors.append(f"expected text, got {type(text).__name__}")
        return result
    tags = list(_TAG.finditer(text))
    label: str | None = None  # label of a ref still waiting for its det
    det_index = 0
    i = 0
    while i < len(tags):
        tag = tags[i]
        kind = tag.group(0)
        nxt = tags[i + 1] if i + 1 < len(tags) else None
        end = nxt.start() if nxt else len(text)
        if kind == REF:
            if label is not None:
                result.errors.append(f"ref {label!r} has no <|det|>")
            label = text[tag.end() : end].strip()
            if nxt is not None and nxt.group(0) == REF_END:
                i += 2
            else:
                result.errors.append(f"<|ref|> at offset {tag.start()} is not closed by <|/ref|>")
                i += 1
        elif kind == DET:
            where = f"det {det_index}" + (f" ({label!r})" if label else "")
            body = text[tag.end() : end]
            if nxt is not None and nxt.group(0) == DET_END:
                i += 2
            else:
                result.errors.append(f"{where}: <|det|> at offset {tag.start()} is not closed by <|/det|>")
                i += 1
            result.boxes += _parse_det(label or "", body, where, result.errors)
            label = None
            det_index += 1
        else:
            result.errors.append(f"stray {kind} at offset {tag.start()}")
            i += 1
    if label is not None:
        result.errors.append(f"ref {label!r} has no <|det|>")
    return result


def _box_coords(box: Box | Sequence[int]) -> list[int]:
    if isinstance(box, Box):
        return [box.x1, box.y1, box.x2, box.y2]
    try:
        coords = [int(v) for v in box]
    except (TypeError, ValueError) as exc:
        raise InputError(f"a box is 4 integer coordinates in 0-999, got {box!r}") from exc
    if len(coords) != 4:
        raise InputError(f"a box needs 4 coordinates, got {len(coords)}: {box}")
    if not all(0 <= v <= 999 for v in coords):
        raise InputError(f"box coordinates must be in 0-999 (the model's scale), got {box}")
    return coords


def format_ref_prompt(expression: str) -> str:
    """Referring-grounding user prompt of the README: ``<image>\\n<|ref|>{expression}<|/ref|>.``"""
    return f"<image>\n{REF}{expression}{REF_END}."


def format_det(label: str, boxes: Sequence[Box | Sequence[int]]) -> str:
    """Answer text ``<|ref|>label<|/ref|><|det|>[[x1, y1, x2, y2], ...]<|/det|>``.

    Lists are written as Python prints them (``", "`` between values and between boxes), the
    spelling of spec 9.1 and of the maintainers' reference output ``[[582, 271, 942, 888]]``.
    """
    lists = ", ".join("[" + ", ".join(str(v) for v in _box_coords(b)) + "]" for b in boxes)
    return f"{REF}{label}{REF_END}{DET}[{lists}]{DET_END}"


def strip_grounding(text: str) -> str:
    """Plain prose: det spans removed, ref/grounding tags dropped (their label text kept)."""
    text = re.sub(r"<\|det\|>.*?(?:<\|/det\|>|$)", "", text, flags=re.DOTALL)
    text = re.sub(r"<\|/?(?:ref|det)\|>|<\|grounding\|>", "", text)
    text = re.sub(r"[ \t]{2,}", " ", text)
    return re.sub(r" +([.,;:!?])", r"\1", text).strip()


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except (OSError, TypeError, ImportError):  # Pillow built without FreeType: fixed bitmap font
        return ImageFont.load_default()


def draw_boxes(image: Image.Image, boxes: Sequence[Box], width: int = 3, font_size: int = 20) -> Image.Image:
    """A copy of ``image`` with each box outlined (colours cycling :data:`COLORS`) and its label
    written above it, kept inside the image."""
    out = image.convert("RGB")  # always a copy
    draw = ImageDraw.Draw(out)
    font = _font(font_size)
    w, h = out.size
    for n, box in enumerate(boxes):
        color = COLORS[n % len(COLORS)]
        x1, y1, x2, y2 = box.to_pixels(w, h)
        x1, x2 = min(max(x1, 0), w - 1), min(max(x2, 0), w - 1)
        y1, y2 = min(max(y1, 0), h - 1), min(max(y2, 0), h - 1)
        draw.rectangle((x1, y1, x2, y2), outline=color, width=width)
        if box.label:  # ink box of the text at (tx, ty): above the box, else just inside it
            left, top, right, bottom = draw.textbbox((0, 0), box.label, font=font)
            tw, th = right - left, bottom - top
            ty = y1 - th - 2 if y1 - th - 2 >= 0 else y1 + width
            tx, ty = min(x1, max(w - tw, 0)), min(ty, max(h - th, 0))
            draw.text((tx - left, ty - top), box.label, font=font, fill=color)
    return out
