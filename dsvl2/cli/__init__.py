"""``dsvl2`` command line: chat | ground | serve | info | eval | train | ocr.

One module per command (``dsvl2/cli/<command>.py``) holds its flags with their help texts
(``add_<command>_arguments``), its examples (``EXAMPLES``, written once: the command's ``--help`` shows
them all, ``dsvl2 --help`` the first of chat, ground, serve and info) and its entry function
(``<command>_main``), a thin layer over a library call a user could make directly. ``main`` here is the
one entry point (the ``dsvl2`` console script, ``python -m dsvl2.cli``); every command runs through
:func:`dsvl2.errors.run_command`, the one exit-status policy, printed at the end of every ``--help``.
Heavy subsystems (server, training, evaluation) are imported only when their subcommand runs.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from ..errors import EXIT_FAILURE, EXIT_HELP, EXIT_USAGE, run_command

# subcommand -> (module, add-arguments function, main function, help)
COMMANDS = {
    "chat": ("dsvl2.cli.chat", "add_chat_arguments", "chat_main", "ask about images (REPL without a question)"),
    "ground": ("dsvl2.cli.ground", "add_ground_arguments", "ground_main", "locate an object and draw its box"),
    "serve": ("dsvl2.cli.serve", "add_serve_arguments", "serve_main", "OpenAI-compatible HTTP server + web chat"),
    "info": ("dsvl2.cli.info", "add_info_arguments", "info_main", "parameters, activated parameters, memory"),
    "eval": ("dsvl2.cli.eval", "add_eval_arguments", "eval_main", "run a benchmark from local files"),
    "train": ("dsvl2.cli.train", "add_train_arguments", "train_main", "train a stage (align / pretrain / sft)"),
    "ocr": ("dsvl2.cli.ocr", "add_ocr_arguments", "ocr_main", "PDFs / page images -> Markdown with DeepSeek-OCR 2"),
}
TOP_EXAMPLES = ("chat", "ground", "serve", "info")  # whose first example ``dsvl2 --help`` shows


def set_examples(parser: argparse.ArgumentParser, examples: Sequence[str], notes: str = "") -> None:
    """Show a command's ``EXAMPLES`` (and notes) under its ``--help``."""
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = "examples:\n  " + "\n  ".join(examples) + (f"\n\n{notes}" if notes else "")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dsvl2", description="DeepSeek-VL2 in plain PyTorch: chat, ground, serve, evaluate, train.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    top = []
    for name, (module, add, main, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        try:
            mod = importlib.import_module(module)
            getattr(mod, add)(p)
            if name in TOP_EXAMPLES:
                top.append(mod.EXAMPLES[0])
        except ImportError as e:  # an optional extra is missing: say which, at run time
            p.set_defaults(_missing=str(e))
        p.epilog = f"{p.epilog}\n\n{EXIT_HELP}" if p.epilog else EXIT_HELP
        p.set_defaults(_main=(module, main))
    parser.epilog = "examples:\n  " + "\n  ".join(top) + "\n\n" + EXIT_HELP
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return EXIT_USAGE
    if getattr(args, "_missing", None):  # a correct command this installation cannot run
        print(f"dsvl2 {args.command}: {args._missing} (install the extra, e.g. pip install 'dsvl2[serve]')",
              file=sys.stderr)
        return EXIT_FAILURE
    module, func = args._main
    return run_command(f"dsvl2 {args.command}", getattr(importlib.import_module(module), func), args)
