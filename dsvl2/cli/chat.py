"""``dsvl2 chat``: answer one question about images, or a multi-turn REPL when no question is given.

A thin layer over ``Pipeline.prepare`` / ``Pipeline.events`` (what ``Pipeline.stream`` uses).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import IO, Any

from ..errors import DSVL2Error
from ..generation.generate import GenerateArgs
from ..pipeline import Completion, Pipeline
from ..processing.grounding import draw_boxes, parse_grounding
from ..processing.images import load_image
from ..processing.template import stop_strings
from . import set_examples
from .loading import add_model_arguments, fail, load_pipeline

EXAMPLES = (
    'dsvl2 chat --image photo.png "What is in this picture?"      # shipped demo model',
    'dsvl2 chat --model ./deepseek-vl2-tiny --image a.png --image b.png "Compare them."',
    'dsvl2 chat --image street.png --ground out.png "<|ref|>the red car<|/ref|>"',
    "dsvl2 chat --model ./deepseek-vl2-tiny                        # REPL: /image PATH, /reset, /quit",
)


def add_chat_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``dsvl2 chat``: a one-shot question, or a multi-turn REPL when none is given."""
    set_examples(parser, EXAMPLES)
    add_model_arguments(parser)
    parser.add_argument("question", nargs="?", default=None, help="the question; omit it for an interactive chat")
    parser.add_argument("--image", action="append", default=[], type=Path,
                        help="an image for the (first) question; repeat for several")
    parser.add_argument("--ground", type=Path, default=None, metavar="OUT.png",
                        help="draw the answer's <|det|> boxes on the last image and save it here")
    parser.add_argument("--max-new-tokens", type=int, default=512)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--stream", action="store_true", help="print the answer as it is generated")
    parser.add_argument("--constrain-boxes", action="store_true",
                        help="keep <|det|> spans to the box grammar [[x1, y1, x2, y2], ...] (0-999 integers)")
    parser.add_argument("--image-token-budget", type=int, default=None, metavar="N",
                        help="fit the conversation's images in N tokens by choosing their tile layouts (instead of "
                             "the official rule: no tiling at all with 3+ images); see docs/grounding.md")
    parser.add_argument("--truncate", choices=["oldest"], default=None,
                        help="drop the oldest turns when the conversation outgrows the context (default: an error)")


def _answer(pipe: Pipeline, history: list[dict[str, Any]], args: argparse.Namespace, out: IO[str]) -> Completion:
    gen = GenerateArgs(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                       constrain_boxes=args.constrain_boxes)
    stop = stop_strings(pipe.tokenizer.eos_token)
    batch = pipe.prepare([pipe.conversation(history)], args.image_token_budget, args.truncate)
    completion = None
    for event in pipe.events(batch, gen, stop, False):
        if isinstance(event, list):
            completion = event[0]
        elif args.stream:
            out.write(event[1])
            out.flush()
    assert completion is not None
    out.write("\n" if args.stream else completion.text + "\n")
    return completion


def usage_line(completion: Completion) -> str:
    """``[context: 1304 of 4096 tokens used (images 421, 421, 421), 2792 left]``."""
    used = completion.prompt_tokens + completion.completion_tokens
    images = ", ".join(map(str, completion.image_tokens))
    shown = f" (images {images})" if images else ""
    return f"[context: {used} of {completion.context_limit} tokens used{shown}, {completion.context_remaining} left]"


def _save_grounding(text: str, images: list[Path], target: Path | None, out: IO[str]) -> None:
    """Draw ``text``'s boxes on the conversation's last image (spec 9.2) and save to ``target``."""
    if target is None:
        return
    if not images:
        out.write("(no image to draw the boxes on)\n")
        return
    boxes = parse_grounding(text).boxes
    draw_boxes(load_image(images[-1]), boxes).save(target)
    out.write(f"[{len(boxes)} box(es) drawn on {images[-1].name} -> {target}]\n")


def chat_main(args: argparse.Namespace, stdin: IO[str] | None = None, out: IO[str] | None = None) -> int:
    """Answer ``args.question`` once, or run a REPL over stdin (history kept across turns)."""
    stdin, out = stdin or sys.stdin, out or sys.stdout
    for path in args.image:
        if not path.is_file():
            return fail(f"image file not found: {path}")
    try:
        pipe = load_pipeline(args)
    except DSVL2Error as exc:
        return fail(str(exc))
    history: list[dict[str, Any]] = []
    images: list[Path] = []
    pending = list(args.image)
    if args.question is not None:
        history.append({"role": "user", "content": args.question, "images": pending})
        try:
            text = _answer(pipe, history, args, out).text
        except DSVL2Error as exc:
            return fail(str(exc))
        _save_grounding(text, pending, args.ground, out)
        return 0
    interactive = stdin.isatty()
    if interactive:
        out.write("dsvl2 chat: /image PATH attaches an image to the next question, /reset, /quit\n")
    while True:
        if interactive:
            out.write("you> ")
            out.flush()
        line = stdin.readline()
        if not line:
            return 0
        line = line.strip()
        if not line:
            continue
        if line in ("/quit", "/exit"):
            return 0
        if line == "/reset":
            history, images, pending = [], [], []
            out.write("[conversation cleared]\n")
            continue
        if line.startswith("/image "):
            path = Path(line[7:].strip()).expanduser()
            if path.is_file():
                pending.append(path)
                out.write(f"[{path.name} attached to the next question]\n")
            else:
                out.write(f"[no such file: {path}]\n")
            continue
        turn = {"role": "user", "content": line, "images": pending}
        try:
            completion = _answer(pipe, [*history, turn], args, out)
        except DSVL2Error as exc:
            out.write(f"[error: {exc}]\n")
            continue
        text = completion.text
        history += [turn, {"role": "assistant", "content": text}]
        images, pending = images + pending, []
        out.write(usage_line(completion) + "\n")
        _save_grounding(text, images, args.ground, out)
