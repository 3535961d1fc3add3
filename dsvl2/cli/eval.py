"""``dsvl2 eval`` (and ``python -m dsvl2.evaluation``): run a benchmark from local files.

A thin layer over :func:`dsvl2.evaluation.evaluate` / :func:`~dsvl2.evaluation.run_suite`; the model is
loaded only when something is left to generate.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from ..errors import EXIT_USAGE, DSVL2Error
from ..evaluation.report import guess_size, markdown, paper_table
from ..evaluation.run import Model, evaluate, run_suite
from ..evaluation.tasks import TASKS
from . import set_examples

EXAMPLES = (
    "python -m dsvl2.demo.tasks --out /tmp/demo --n 20 --seed 7",
    "dsvl2 eval --task demo --data /tmp/demo/data.jsonl --out runs/eval-demo    # the shipped demo model",
    "dsvl2 eval --model deepseek-vl2-tiny --task chartqa --data LMUData/ChartQA_TEST.tsv --limit 100 "
    "--out runs/chartqa",
    "dsvl2 eval --model deepseek-vl2-small --task docvqa --data hf/DocVQA --split validation --out runs/docvqa",
    "dsvl2 eval --model deepseek-vl2-small --suite paper --data LMUData --out runs/paper",
)
NOTES = """--data: a VLMEvalKit .tsv, a parquet file or folder (Hugging Face copy), or the demo data.jsonl.
Re-running the same command resumes: answers already in OUT/predictions.jsonl are kept."""


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``dsvl2 eval`` flags (also used by ``python -m dsvl2.evaluation``)."""
    set_examples(parser, EXAMPLES, NOTES)
    parser.add_argument("--model", default=None,
                        help="model folder (official Hugging Face layout); default: the shipped demo model")
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--task", choices=list(TASKS), help="one benchmark")
    which.add_argument("--suite", choices=["paper"], help="every paper benchmark found below --data")
    parser.add_argument("--data", required=True, help="benchmark file/folder (--task) or a folder of them (--suite)")
    parser.add_argument("--split", default=None, help="split (default: the task's, e.g. validation for DocVQA)")
    parser.add_argument("--limit", type=int, default=None, help="first N examples (MMBench: N questions)")
    parser.add_argument("--batch-size", type=int, default=1, help="conversations per generate_batch call")
    parser.add_argument("--out", required=True, help="output folder (re-use it to resume)")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="default 512, DeepSeek's setting")
    parser.add_argument("--chunk-size", type=int, default=None, help="chunked prefill (DeepSeek used 512)")
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--paper-size", choices=["tiny", "small", "base"], default=None,
                        help="published numbers to show with --suite (default: guessed from --model)")
    parser.add_argument("--draw", type=int, default=8, help="grounding example images to save")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def load_model(model_dir: str | None, dtype: str, device: str | None) -> Model:
    """``dsvl2.load`` (imported here: torch is needed only when something is generated);
    ``model_dir`` None = the shipped demo model, ``device`` None = cuda if available."""
    import dsvl2

    return dsvl2.load(model_dir, dtype=dtype, device=device)


def eval_main(args: argparse.Namespace) -> int:
    """``dsvl2 eval``: run, print the markdown table to stdout, return the exit status."""
    common = {"batch_size": args.batch_size, "max_new_tokens": args.max_new_tokens, "chunk_size": args.chunk_size,
              "progress": not args.no_progress, "n_drawings": args.draw, "limit": args.limit}

    def model() -> Model:  # loaded only if something is left to generate
        return load_model(args.model, args.dtype, args.device)

    try:
        if args.suite:
            size = args.paper_size or guess_size(args.model)
            results = run_suite(model, args.data, args.out, size=size, **common)
            print(paper_table(results, size), end="")
        else:
            summary = evaluate(model, args.task, args.data, args.out, split=args.split, **common)
            print(markdown(summary), end="")
    except DSVL2Error as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m dsvl2.evaluation``: ``dsvl2 eval`` with these arguments (the one ``dsvl2`` main)."""
    from . import main as dsvl2_main

    return dsvl2_main(["eval", *(sys.argv[1:] if argv is None else argv)])
