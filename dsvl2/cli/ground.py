"""``dsvl2 ground``: locate an expression in one image, print the boxes and draw them (``Pipeline.ground``)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import IO

from ..errors import DSVL2Error
from ..processing.grounding import draw_boxes
from ..processing.images import load_image
from . import set_examples
from .loading import add_model_arguments, fail, load_pipeline

EXAMPLES = ('dsvl2 ground --image street.png "the red car" -o out.png',)


def add_ground_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``dsvl2 ground``: locate an expression in one image."""
    set_examples(parser, EXAMPLES)
    add_model_arguments(parser)
    parser.add_argument("expression", help="what to find, e.g. 'the red car'")
    parser.add_argument("--image", type=Path, required=True, help="the image to search")
    parser.add_argument("-o", "--output", type=Path, default=None, help="save the image with the boxes drawn here")
    parser.add_argument("--json", action="store_true", help="print the boxes as JSON")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--no-constrain-boxes", dest="constrain_boxes", action="store_false",
                        help="let the model write any text inside <|det|> (default: only well-formed box lists)")
    parser.add_argument("--ordered-boxes", action="store_true",
                        help="also keep x1 <= x2 and y1 <= y2 in every box (slower per token; docs/grounding.md)")


def ground_main(args: argparse.Namespace, out: IO[str] | None = None) -> int:
    """Print the boxes found for ``args.expression`` (pixels in the original image) and draw them."""
    out = out or sys.stdout
    if not args.image.is_file():
        return fail(f"image file not found: {args.image}")
    try:
        image = load_image(args.image)
        pipe = load_pipeline(args)
        result = pipe.ground(image, args.expression, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                             constrain_boxes=args.constrain_boxes, ordered_boxes=args.ordered_boxes)
    except DSVL2Error as exc:
        return fail(str(exc))
    boxes = [{"label": b.label, "box": list(b.to_pixels(*image.size)), "box_999": [b.x1, b.y1, b.x2, b.y2]}
             for b in result.boxes]
    if args.json:
        out.write(json.dumps({"boxes": boxes, "errors": result.errors}) + "\n")
    else:
        for b in boxes:
            out.write(f"{b['label']}\t{' '.join(map(str, b['box']))}\n")
        if not boxes:
            out.write(f"no box found for {args.expression!r}\n")
    if args.output is not None:
        draw_boxes(image, result.boxes).save(args.output)
        if not args.json:
            out.write(f"[{len(boxes)} box(es) drawn -> {args.output}]\n")
    return 0
