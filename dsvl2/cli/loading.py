"""What ``dsvl2 chat``, ``ground`` and ``serve`` share: the model flags, loading with a progress bar, and
printing a caught error with its exit status (2 for input errors, :mod:`dsvl2.errors`).

Without ``--model`` the shipped demo model is used (``dsvl2.load(None)``). Loading shows a progress bar
on a terminal (tqdm when installed, a plain percentage otherwise).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

from ..errors import EXIT_USAGE
from ..pipeline import Pipeline, load


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


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
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


def load_pipeline(args: argparse.Namespace) -> Pipeline:
    with load_progress() as progress:
        return load(args.model, dtype=args.dtype, device=args.device, progress=progress,
                    exact=args.exact, quantize=args.quantize)


def fail(message: str, status: int = EXIT_USAGE) -> int:
    print(f"error: {message}", file=sys.stderr)
    return status
