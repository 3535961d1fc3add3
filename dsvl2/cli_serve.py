"""``dsvl2 serve``, ``dsvl2 chat`` and ``dsvl2 ground``: argument definitions and entry functions.

``dsvl2/cli.py`` wires the subcommands to ``add_*_arguments`` / ``*_main`` here; each main is a thin
layer over a library call a user could make directly (``create_app``, ``Pipeline.stream``,
``Pipeline.ground``). Without ``--model`` the shipped demo model is used (``dsvl2.load(None)``).
Loading shows a progress bar on a terminal (tqdm when installed, a plain percentage otherwise).
Run ``python -m dsvl2.cli_serve serve|chat|ground ...`` to try them without ``dsvl2/cli.py``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

from .errors import EXIT_FAILURE, EXIT_HELP, EXIT_USAGE, DSVL2Error, run_command
from .generation.generate import GenerateArgs
from .pipeline import Completion, Pipeline, load
from .processing.grounding import draw_boxes, parse_grounding
from .processing.images import load_image
from .processing.template import stop_strings

SERVE_HELP = {
    "host": "address to bind; loopback by default (use 0.0.0.0 only with --api-key)",
    "port": "TCP port",
    "api_key": "require 'Authorization: Bearer KEY' on every API route (default: $DSVL2_API_KEY)",
    "model_name": "model id reported by /v1/models (default: the model folder's name)",
    "max_body_bytes": "largest accepted request body, in bytes (413 above)",
    "max_images": "most images per request (400 above)",
    "max_image_pixels": "largest image, width x height (413 above)",
    "max_context": "lower the context limit (prompt + max_tokens) below the model's",
    "default_max_tokens": "max_tokens when a request gives none",
    "max_batch_size": "most requests decoded together (slots of the continuous batch)",
    "max_queue": "most waiting requests beyond the slots (503 with Retry-After above)",
    "prefill_chunk": "prompt tokens a newcomer prefills between two decode steps of the running requests",
    "no_cuda_graphs": "on CUDA, decode eagerly instead of replaying a captured CUDA graph per batch size",
    "allow_remote_images": "let requests name http(s) image URLs, fetched by the server",
    "local_images": "let requests name image files under this folder (paths or file:// URLs)",
    "chunk_size": "prefill chunk length for long prompts (saves GPU memory)",
}


# ---- shared ----------------------------------------------------------------------------------------
@contextlib.contextmanager
def load_progress(enabled: bool | None = None,
                  stream: IO[str] | None = None) -> Iterator[Callable[[int, int], None] | None]:
    """A ``progress(done_bytes, total_bytes)`` callback for ``dsvl2.load`` drawing a bar on ``stream``.

    ``enabled=None`` shows it only when ``stream`` (stderr) is a terminal. Uses tqdm if importable.
    """
    stream = stream or sys.stderr
    if enabled is None:
        enabled = stream.isatty()
    if not enabled:
        yield None
        return
    state: dict[str, Any] = {"bar": None, "shown": -1}
    try:
        from tqdm import tqdm
    except ImportError:
        tqdm = None

    def progress(done: int, total: int) -> None:
        if tqdm is not None:
            if state["bar"] is None:
                state["bar"] = tqdm(total=total, unit="B", unit_scale=True, desc="loading weights", file=stream)
            state["bar"].update(done - state["bar"].n)
            return
        percent = 100 * done // max(total, 1)
        if percent != state["shown"]:
            state["shown"] = percent
            stream.write(f"\rloading weights {percent:3d}% ({done / 2**20:.0f}/{total / 2**20:.0f} MiB)")
            stream.flush()

    ok = False
    try:
        yield progress
        ok = True
    finally:  # bytes the model skips (the unused pooling head) never count: show a finished load as 100%
        bar = state["bar"]
        if bar is not None:
            if ok:
                bar.update(bar.total - bar.n)
            bar.close()
        elif state["shown"] >= 0:
            stream.write(" done\n" if ok else "\n")


def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=Path, default=None,
                        help="model folder in the Hugging Face layout (default: the shipped demo model)")
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"], help="weight dtype")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--exact", action="store_true",
                        help="run every op in its reference form (the path the parity tests use) instead of the fast "
                             "plan for this machine (SDPA attention; on CPU in bf16 dsvl2's C kernels: bf16-close)")
    parser.add_argument("--quantize", choices=["int8", "int4"], default=None,
                        help="weight-only language model: int8 about half the memory and bytes read per token of "
                             "bf16, int4 (groups of 64 columns) about a quarter")


def _load(args: argparse.Namespace) -> Pipeline:
    with load_progress() as progress:
        return load(args.model, dtype=args.dtype, device=args.device, progress=progress,
                    exact=args.exact, quantize=args.quantize)


def _fail(message: str, status: int = EXIT_USAGE) -> int:
    print(f"error: {message}", file=sys.stderr)
    return status


# ---- serve ---------------------------------------------------------------------------------------------
def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``dsvl2 serve``: the model flags plus one per :class:`ServeArgs` field."""
    from .serving import ServeArgs  # FastAPI itself is imported by serve_main

    parser.epilog = "example: dsvl2 serve --model deepseek-vl2-tiny --port 8000  (then open http://127.0.0.1:8000/)"
    _add_model_arguments(parser)
    for f in dataclasses.fields(ServeArgs):
        flag = "--" + f.name.replace("_", "-")
        if f.type in ("bool", bool):
            parser.add_argument(flag, action="store_true", help=SERVE_HELP[f.name])
            continue
        kind = {"int": int, "float": float, "str": str}.get(str(f.type).split(" ")[0], str)
        if "Path" in str(f.type):
            kind = Path
        default = os.environ.get("DSVL2_API_KEY") if f.name == "api_key" else f.default
        shown = "" if f.default is None else f" (default: {f.default})"
        parser.add_argument(flag, type=kind, default=default, help=SERVE_HELP[f.name] + shown)


def serve_main(args: argparse.Namespace) -> int:
    """Load the model and serve it with uvicorn until interrupted."""
    from .serving import ServeArgs

    try:
        import uvicorn

        from .serving.app import create_app
    except ImportError as exc:
        return _fail(f"{exc.name} is missing; install the server extra: pip install 'dsvl2[serve]'", EXIT_FAILURE)

    serve = ServeArgs(**{f.name: getattr(args, f.name) for f in dataclasses.fields(ServeArgs)})
    if serve.host not in ("127.0.0.1", "localhost", "::1") and not serve.api_key:
        print(f"warning: serving on {serve.host} without --api-key: anyone who can reach it can use it",
              file=sys.stderr)
    try:
        pipe = _load(args)
    except DSVL2Error as exc:
        return _fail(str(exc))
    app = create_app(pipe, serve)
    print(f"dsvl2: serving {app.state.model_id} on http://{serve.host}:{serve.port}/ (chat page at /, API at /v1)",
          file=sys.stderr)
    uvicorn.run(app, host=serve.host, port=serve.port, log_level="info", timeout_graceful_shutdown=10)
    return 0


# ---- chat ---------------------------------------------------------------------------------------------
def add_chat_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``dsvl2 chat``: a one-shot question, or a multi-turn REPL when none is given."""
    parser.epilog = ('examples: dsvl2 chat --image cat.png "What is in the picture?"\n'
                     '          dsvl2 chat --image street.png --ground out.png "<|ref|>the red car<|/ref|>"\n'
                     "          dsvl2 chat --image cat.png   (REPL: /image PATH, /reset, /quit)")
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    _add_model_arguments(parser)
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
            return _fail(f"image file not found: {path}")
    try:
        pipe = _load(args)
    except DSVL2Error as exc:
        return _fail(str(exc))
    history: list[dict[str, Any]] = []
    images: list[Path] = []
    pending = list(args.image)
    if args.question is not None:
        history.append({"role": "user", "content": args.question, "images": pending})
        try:
            text = _answer(pipe, history, args, out).text
        except DSVL2Error as exc:
            return _fail(str(exc))
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


# ---- ground ---------------------------------------------------------------------------------------------
def add_ground_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``dsvl2 ground``: locate an expression in one image."""
    parser.epilog = 'example: dsvl2 ground --image street.png "the red car" -o out.png'
    _add_model_arguments(parser)
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
        return _fail(f"image file not found: {args.image}")
    try:
        image = load_image(args.image)
        pipe = _load(args)
        result = pipe.ground(image, args.expression, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                             constrain_boxes=args.constrain_boxes, ordered_boxes=args.ordered_boxes)
    except DSVL2Error as exc:
        return _fail(str(exc))
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


def main(argv: list[str] | None = None) -> int:
    """``python -m dsvl2.cli_serve serve|chat|ground ...`` (``dsvl2/cli.py`` is the real entry point)."""
    parser = argparse.ArgumentParser(prog="dsvl2", epilog=EXIT_HELP)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, add, run in (("serve", add_serve_arguments, serve_main), ("chat", add_chat_arguments, chat_main),
                           ("ground", add_ground_arguments, ground_main)):
        add(sub.add_parser(name, help=(run.__doc__ or "").splitlines()[0]))
        sub.choices[name].set_defaults(run=run)
    args = parser.parse_args(argv)
    return run_command(f"dsvl2 {args.command}", args.run, args)


if __name__ == "__main__":
    sys.exit(main())
