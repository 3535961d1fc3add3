"""``dsvl2 ocr``: PDFs and page images -> Markdown (+ layout boxes) with DeepSeek-OCR 2 (:func:`dsvl2.ocr.run_ocr`)."""

from __future__ import annotations

import argparse
import sys

from ..ocr import OCRArgs, run_ocr
from . import set_examples

EXAMPLES = ("dsvl2 ocr --model ./DeepSeek-OCR-2 paper.pdf scan.png -o out/   # Markdown + boxes per document",)


def add_ocr_arguments(parser: argparse.ArgumentParser) -> None:
    set_examples(parser, EXAMPLES)
    parser.add_argument("inputs", nargs="+", help="PDF files and/or page images")
    parser.add_argument("--model", required=True, help="a DeepSeek-OCR 2 directory (official Hugging Face layout)")
    parser.add_argument("-o", "--out", required=True, help="output folder (created; reruns resume)")
    parser.add_argument("--prompt", default="markdown",
                        help="'markdown' (grounded layout, the default), 'free' (Free OCR.) or your own prompt")
    parser.add_argument("--dpi", type=int, default=144, help="PDF rendering resolution (default 144, as official)")
    parser.add_argument("--batch-size", type=int, default=1, help="pages decoded together")
    parser.add_argument("--max-new-tokens", type=int, default=8192)
    parser.add_argument("--keep-boxes", action="store_true", help="keep the <|ref|>/<|det|> layout spans in the .md")
    parser.add_argument("--no-repeat-ngram", type=int, default=20, help="official anti-loop n (0: off)")
    parser.add_argument("--no-repeat-window", type=int, default=90)
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    parser.add_argument("--device", default=None)
    parser.add_argument("--quantize", choices=["int8"], default=None, help="int8 weight-only language model")
    parser.add_argument("--exact", action="store_true",
                        help="every op in its reference form instead of the fast plan for this machine")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def ocr_main(args: argparse.Namespace) -> int:
    from ..pipeline import load

    opts = OCRArgs(prompt=args.prompt, dpi=args.dpi, batch_size=args.batch_size,
                   max_new_tokens=args.max_new_tokens, keep_boxes=args.keep_boxes,
                   no_repeat_ngram=args.no_repeat_ngram, no_repeat_window=args.no_repeat_window)
    pipe = load(args.model, dtype=args.dtype, device=args.device, quantize=args.quantize, exact=args.exact)
    bar = None if args.quiet else _progress_bar()
    try:
        written = run_ocr(pipe, args.inputs, args.out, opts, bar)
    finally:
        if bar is not None:
            bar.close()
    for path in written:
        print(path)
    return 0


def _progress_bar():
    """A per-page bar: tqdm when installed (the ``ocr`` extra), else one stderr line per page."""
    try:
        from tqdm import tqdm
    except ImportError:
        tqdm = None

    class Bar:
        def __init__(self) -> None:
            self.bar = None

        def __call__(self, done: int, total: int, label: str) -> None:
            if tqdm is None:
                print(f"page {done}/{total} {label}", file=sys.stderr)
                return
            if self.bar is None:
                self.bar = tqdm(total=total, unit="page", initial=done)
            else:
                self.bar.update(done - self.bar.n)
            self.bar.set_postfix_str(label)

        def close(self) -> None:
            if self.bar is not None:
                self.bar.close()

    return Bar()
