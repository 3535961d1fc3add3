"""Synthetic data for the demo model: grounding, reading and bar-chart tasks.

The three tasks follow the issue's definitions literally, because the held-out data is generated
independently from the same definitions:

- **grounding**: a W×H image (each uniform in [256, 768]) on a plain light background (white, or each channel
  uniform in [220, 255]); each colour name is drawn in one of a few shades, Pillow's named colour first with 1-4 non-overlapping shapes, each a distinct (colour, shape) pair. A
  shape's bounding box is square, its side 15-40 % of the shorter image side, and it is the tight box
  of the drawn pixels (a triangle's box is its vertices' extent). Prompt
  ``<image>\\n<|ref|>the {colour} {shape}<|/ref|>.``; answer
  ``<|ref|>the {colour} {shape}<|/ref|><|det|>[[x1, y1, x2, y2]]<|/det|>`` in 0-999 coordinates.
- **reading**: one word of ``words.txt`` in black, ``ImageFont.load_default(size)`` with size in
  [28, 56], at a random position on a white image of random size in [200, 512] per side.
- **charts**: 3-5 bars labelled A, B, C... under the bars, integer heights 1-9, a y-axis with tick
  labels 0-9 or 0-10, on a white image of random size in [256, 512] per side.

Pixel boxes are inclusive: ``(x1, y1, x2, y2)`` are the first and last columns/rows the shape
covers, exactly what Pillow's ``ImageDraw`` takes, so the side is ``x2 - x1``.

0-999 coordinates (spec §9.1): the official de-normalisation is ``int(v / 999 * W)``
(:meth:`dsvl2.processing.grounding.Box.to_pixels`). We encode a pixel coordinate ``p`` as
``round((p + 0.5) * 999 / W)`` (the pixel's centre), so that ``v / 999 * W`` lands inside
``[p + 0.5 - W / 1998, p + 0.5 + W / 1998]`` and floors back to exactly ``p`` for every image side
below 999 px (all demo images). Prompt and answer are written by
:mod:`dsvl2.processing.grounding` (official spacing ``[[x1, y1, x2, y2]]``).

Every random choice goes through the ``random.Random`` passed in, so a seed fixes the data.
``python -m dsvl2.demo.tasks --out DIR --n 50 --seed 1`` writes a dataset and a contact sheet.
"""

import argparse
import json
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from random import Random
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from dsvl2.errors import InputError
from dsvl2.processing.grounding import format_det, format_ref_prompt, parse_grounding

TASKS = ("grounding", "reading", "charts")

# RGB variants per colour name: Pillow's named colour first (what an independent generator most
# likely draws), then common shades. Every variant has a channel far below 220, so no shape ever
# matches a light background; a small per-shape jitter keeps a model from keying on exact values.
COLOURS = {
    "red": ((255, 0, 0), (210, 30, 30), (220, 20, 60), (178, 34, 34)),
    "green": ((0, 128, 0), (30, 150, 50), (34, 139, 34), (0, 180, 0)),
    "blue": ((0, 0, 255), (30, 60, 200), (65, 105, 225), (0, 0, 160)),
    "yellow": ((255, 255, 0), (235, 195, 0), (255, 215, 0), (240, 230, 40)),
    "purple": ((128, 0, 128), (130, 40, 160), (148, 0, 211), (160, 32, 240)),
    "orange": ((255, 165, 0), (240, 130, 0), (255, 140, 0), (255, 110, 20)),
    "black": ((0, 0, 0), (15, 15, 15), (40, 40, 40)),
}
SHAPES = ("circle", "square", "triangle")
COLOUR_JITTER = 12
SHAPE_GAP = 4  # px of background kept between two shapes' boxes, so each box stays unambiguous
BAR_COLOURS = ((66, 114, 196), (237, 125, 49), (112, 173, 71), (165, 42, 42), (112, 48, 160),
               (40, 40, 40), (0, 139, 139), (200, 60, 120))


@dataclass
class Sample:
    """One demo example: the image, the user prompt, the expected answer and the ground truth."""

    task: str  # "grounding" | "reading" | "charts"
    image: Image.Image
    prompt: str
    answer: str
    box: tuple[int, int, int, int] | None = None  # inclusive pixel box of the target (grounding)
    meta: dict[str, Any] = field(default_factory=dict)


def box_to_999(box: Sequence[int], width: int, height: int) -> list[int]:
    """Pixel box -> official 0-999 coordinates (pixel centres, see the module docstring)."""
    sizes = (width, height, width, height)
    return [min(999, max(0, round((p + 0.5) * 999 / s))) for p, s in zip(box, sizes)]


def load_words(path: str | Path | None = None) -> list[str]:
    """The reading task's word list: one word per line; defaults to the copy shipped here."""
    if path is None:
        text = resources.files("dsvl2.demo").joinpath("words.txt").read_text(encoding="utf-8")
        path = "dsvl2/demo/words.txt"
    else:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as err:
            raise InputError(f"cannot read the word list {path}: {err}") from err
    words = [w.strip() for w in text.splitlines() if w.strip()]
    if not words:
        raise InputError(f"the word list {path} is empty")
    return words


def _jitter(rng: Random, rgb: tuple[int, int, int]) -> tuple[int, int, int]:
    return tuple(min(255, max(0, c + rng.randint(-COLOUR_JITTER, COLOUR_JITTER))) for c in rgb)


def _apart(a: Sequence[int], b: Sequence[int]) -> bool:
    return (a[2] + SHAPE_GAP < b[0] or b[2] + SHAPE_GAP < a[0]
            or a[3] + SHAPE_GAP < b[1] or b[3] + SHAPE_GAP < a[1])


def _place_boxes(rng: Random, n: int, width: int, height: int) -> list[tuple[int, int, int, int]]:
    """n square, pairwise separated boxes with side 15-40 % of the short side (rejection sampling)."""
    short = min(width, height)
    lo, hi = -(-15 * short // 100), 40 * short // 100
    while True:  # a full restart if one shape cannot be placed; rare, and still seed-determined
        boxes: list[tuple[int, int, int, int]] = []
        for _ in range(n):
            for _ in range(200):
                side = rng.randint(lo, hi)
                x, y = rng.randint(0, width - 1 - side), rng.randint(0, height - 1 - side)
                box = (x, y, x + side, y + side)
                if all(_apart(box, other) for other in boxes):
                    boxes.append(box)
                    break
            else:
                break
        if len(boxes) == n:
            return boxes


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: Sequence[int], rgb: tuple,
                orientation: str) -> None:
    x1, y1, x2, y2 = box
    if shape == "circle":
        draw.ellipse(box, fill=rgb)
    elif shape == "square":
        draw.rectangle(box, fill=rgb)
    else:  # isosceles triangle, apex on the middle of one side: its vertices span the whole box
        xm, ym = (x1 + x2) // 2, (y1 + y2) // 2
        vertices = {"up": [(x1, y2), (x2, y2), (xm, y1)], "down": [(x1, y1), (x2, y1), (xm, y2)],
                    "left": [(x2, y1), (x2, y2), (x1, ym)], "right": [(x1, y1), (x1, y2), (x2, ym)]}
        draw.polygon(vertices[orientation], fill=rgb)


def make_grounding(rng: Random) -> Sample:
    """A light image with 1-4 shapes; the prompt refers to one of them by colour and shape."""
    width, height = rng.randint(256, 768), rng.randint(256, 768)
    background = (255, 255, 255) if rng.random() < 0.3 else tuple(rng.randint(220, 255) for _ in range(3))
    pairs = rng.sample([(c, s) for c in COLOURS for s in SHAPES], rng.randint(1, 4))
    boxes = _place_boxes(rng, len(pairs), width, height)
    image = Image.new("RGB", (width, height), background)
    draw = ImageDraw.Draw(image)
    shapes = []
    for (colour, shape), box in zip(pairs, boxes):
        rgb = _jitter(rng, rng.choice(COLOURS[colour]))
        orientation = rng.choice(("up", "down", "left", "right"))
        _draw_shape(draw, shape, box, rgb, orientation)
        shapes.append({"colour": colour, "shape": shape, "rgb": rgb, "box": box,
                       "orientation": orientation if shape == "triangle" else None})
    target = rng.randrange(len(shapes))
    colour, shape, box = shapes[target]["colour"], shapes[target]["shape"], shapes[target]["box"]
    label = f"the {colour} {shape}"
    return Sample(task="grounding", image=image, prompt=format_ref_prompt(label),
                  answer=format_det(label, [box_to_999(box, width, height)]), box=box,
                  meta={"background": background, "shapes": shapes, "target": target})


def make_reading(rng: Random, words: Sequence[str]) -> Sample:
    """One black word at a random position on a white image; the side grows to fit a long word."""
    word = rng.choice(words)
    size = rng.randint(28, 56)
    font = ImageFont.load_default(size)
    left, top, right, bottom = font.getbbox(word)
    margin = 4
    width = rng.randint(min(512, max(200, right - left + 2 * margin)), 512)
    height = rng.randint(min(512, max(200, bottom - top + 2 * margin)), 512)
    x = rng.randint(margin - left, max(margin - left, width - margin - right))
    y = rng.randint(margin - top, max(margin - top, height - margin - bottom))
    image = Image.new("RGB", (width, height), (255, 255, 255))
    ImageDraw.Draw(image).text((x, y), word, fill=(0, 0, 0), font=font)
    return Sample(task="reading", image=image, prompt="<image>\nRead the text in the image.",
                  answer=word, meta={"font_size": size, "xy": (x, y),
                                     "text_box": (x + left, y + top, x + right, y + bottom)})


def make_charts(rng: Random) -> Sample:
    """A bar chart with a 0-9 or 0-10 y-axis and lettered bars; the prompt asks for one bar's value."""
    width, height = rng.randint(256, 512), rng.randint(256, 512)
    n = rng.randint(3, 5)
    values = [rng.randint(1, 9) for _ in range(n)]
    letters = [chr(ord("A") + i) for i in range(n)]
    top, right = rng.randint(8, 30), rng.randint(8, 40)
    font_size = rng.randint(10, 20)
    y_max = rng.choice((9, 10))  # an independent generator may end the axis at 9 or at 10
    font = ImageFont.load_default(font_size)
    left = rng.randint(12, 40) + int(font.getlength(str(y_max)))
    bottom = font_size + rng.randint(10, 30)
    base_y, unit = height - bottom, (height - bottom - top) / y_max  # y pixel of value 0, px per unit
    image = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    grid = rng.random() < 0.5
    for v in range(y_max + 1):
        y = round(base_y - v * unit)
        if grid and v > 0:
            draw.line([(left + 1, y), (width - right, y)], fill=(225, 225, 225))
        draw.line([(left - 5, y), (left, y)], fill=(0, 0, 0))
        draw.text((left - 8, y), str(v), fill=(0, 0, 0), font=font, anchor="rm")
    draw.line([(left, top), (left, base_y)], fill=(0, 0, 0), width=2)
    draw.line([(left, base_y), (width - right, base_y)], fill=(0, 0, 0), width=2)
    colours = rng.sample(BAR_COLOURS, n) if rng.random() < 0.5 else [rng.choice(BAR_COLOURS)] * n
    slot = (width - right - left) / n
    fraction = rng.uniform(0.4, 0.8)
    bars = []
    for i, (value, colour) in enumerate(zip(values, colours)):
        cx = left + (i + 0.5) * slot
        x1, x2 = round(cx - fraction * slot / 2), round(cx + fraction * slot / 2)
        y1 = round(base_y - value * unit)
        draw.rectangle([x1, y1, x2, base_y - 1], fill=colour)
        draw.text((cx, base_y + 5), letters[i], fill=(0, 0, 0), font=font, anchor="mt")
        bars.append((x1, y1, x2, base_y - 1))
    asked = rng.randrange(n)
    return Sample(task="charts", image=image,
                  prompt=f"<image>\nWhat is the value of bar {letters[asked]}?",
                  answer=str(values[asked]),
                  meta={"values": values, "letters": letters, "bars": bars, "asked": asked, "y_max": y_max})


def make_sample(task: str, rng: Random, words: Sequence[str]) -> Sample:
    """One sample of the named task."""
    if task == "grounding":
        return make_grounding(rng)
    if task == "reading":
        return make_reading(rng, words)
    if task == "charts":
        return make_charts(rng)
    raise InputError(f"unknown demo task {task!r}; expected one of {TASKS}")


def generate(n_per_task: int, seed: int, tasks: Sequence[str] = TASKS,
             words: Sequence[str] | None = None) -> list[Sample]:
    """n samples per task; each task has its own RNG stream, so a bigger n extends a smaller one."""
    words = load_words() if words is None else words
    samples = []
    for task in tasks:
        rng = Random(f"dsvl2-demo/{task}/{seed}")
        samples += [make_sample(task, rng, words) for _ in range(n_per_task)]
    return samples


def to_conversation(sample: Sample) -> list[dict[str, Any]]:
    """The training view: one user turn with the image, one assistant turn with the answer."""
    return [{"role": "user", "content": sample.prompt, "images": [sample.image]},
            {"role": "assistant", "content": sample.answer}]


def eval_row(sample: Sample, sample_id: str = "", image: str = "") -> dict[str, Any]:
    """The evaluation row of a sample (a line of ``data.jsonl``; :mod:`dsvl2.evaluation.tasks.demo`)."""
    row: dict[str, Any] = {"id": sample_id, "task": f"demo_{sample.task}", "image": image,
                           "prompt": sample.prompt, "answer": sample.answer,
                           "width": sample.image.width, "height": sample.image.height}
    if sample.box is not None:
        row["box"] = list(sample.box)
    return row


def write_dataset(out_dir: str | Path, n_per_task: int, seed: int,
                  tasks: Sequence[str] = TASKS, words_path: str | Path | None = None) -> Path:
    """Write ``images/*.png``, ``data.jsonl`` (evaluation rows) and ``conversations.jsonl``.

    ``data.jsonl`` is what the evaluation harness reads: ``id, task ("demo_<task>"), image, prompt,
    answer, width, height`` and, for grounding, the inclusive pixel ``box``. ``conversations.jsonl``
    holds the same samples in the training format of :mod:`dsvl2.training.data`. Returns the path
    of ``data.jsonl``.
    """
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    samples = generate(n_per_task, seed, tasks, load_words(words_path))
    counters = dict.fromkeys(tasks, 0)
    with open(out / "data.jsonl", "w") as data, open(out / "conversations.jsonl", "w") as convs:
        for sample in samples:
            sample_id = f"{sample.task}-{seed}-{counters[sample.task]:05d}"
            counters[sample.task] += 1
            rel = f"images/{sample_id}.png"
            sample.image.save(out / rel)
            data.write(json.dumps(eval_row(sample, sample_id, rel)) + "\n")
            messages = to_conversation(sample)
            messages[0]["images"] = [rel]
            convs.write(json.dumps({"id": sample_id, "messages": messages}) + "\n")
    return out / "data.jsonl"


def contact_sheet(samples: Sequence[Sample], columns: int = 4, cell: int = 300) -> Image.Image:
    """A grid of thumbnails with prompt and answer under each.

    Grounding answers are parsed back and their de-normalised boxes drawn in magenta, so the sheet
    shows the whole chain: truth -> 0-999 text -> parser -> pixels.
    """
    font = ImageFont.load_default(12)
    text_h = 100
    rows = -(-len(samples) // columns)
    sheet = Image.new("RGB", (columns * cell, rows * (cell + text_h)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for i, sample in enumerate(samples):
        x0, y0 = (i % columns) * cell, (i // columns) * (cell + text_h)
        scale = min((cell - 10) / sample.image.width, (cell - 10) / sample.image.height)
        thumb = sample.image.resize((round(sample.image.width * scale),
                                     round(sample.image.height * scale)), Image.BICUBIC)
        sheet.paste(thumb, (x0 + 5, y0 + 5))
        draw.rectangle([x0 + 4, y0 + 4, x0 + 5 + thumb.width, y0 + 5 + thumb.height],
                       outline=(160, 160, 160))
        for box in parse_grounding(sample.answer).boxes:
            bx1, by1, bx2, by2 = (v * scale + 5 for v in box.to_pixels(*sample.image.size))
            draw.rectangle([x0 + bx1, y0 + by1, x0 + bx2, y0 + by2], outline=(255, 0, 255))
        lines = [f"{sample.task} {sample.image.width}x{sample.image.height}"]
        lines += textwrap.wrap("Q: " + sample.prompt.replace("\n", "\\n"), 46)
        lines += textwrap.wrap("A: " + sample.answer, 46)
        draw.multiline_text((x0 + 5, y0 + cell), "\n".join(lines[:6]), fill=(0, 0, 0), font=font)
    return sheet


def main(argv: Sequence[str] | None = None) -> None:
    """CLI: write a dataset and ``contact_sheet.png`` (4 samples of each task) into --out."""
    parser = argparse.ArgumentParser(
        description="Write the demo tasks' synthetic data.",
        epilog="example: python -m dsvl2.demo.tasks --out /tmp/demo --n 50 --seed 1")
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--n", type=int, default=50, help="samples per task")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    parser.add_argument("--words", type=Path, default=None, help="word list (default: shipped)")
    args = parser.parse_args(argv)
    path = write_dataset(args.out, args.n, args.seed, args.tasks, args.words)
    shown = generate(min(args.n, 4), args.seed, args.tasks, load_words(args.words))
    contact_sheet(shown).save(args.out / "contact_sheet.png")
    print(f"wrote {path} and {args.out / 'contact_sheet.png'}")


if __name__ == "__main__":
    main()
