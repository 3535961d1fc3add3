"""The evaluation runner: resumable predictions, summary JSON, markdown table, paper suite.

``evaluate(model, task, data, out)`` writes into ``out``:

- ``predictions.jsonl``: one line per example (id, raw prediction, scored answer, score, gold,
  categories), appended and flushed as each answer is produced. A re-run with the same ``out``
  skips the ids already there, so a crash loses at most the batch in flight; a last line cut by
  the crash is dropped and cut from the file.
- ``summary.json`` / ``results.md``: recomputed from the JSONL on every run (overall and per
  category), written atomically.
- ``examples/*.png`` for grounding tasks: true (green) and predicted (red) boxes.
- ``run.json``: task and split; a re-run into the same folder with another task or split is refused.

The model is anything with ``generate_batch`` (:class:`Model`); the CLI loads it with
``dsvl2.load``. ``add_eval_arguments`` / ``eval_main`` are what ``dsvl2 eval`` wires to.
"""

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

from dsvl2.errors import EXIT_HELP, EXIT_USAGE, DSVL2Error, InputError, run_command
from dsvl2.evaluation.report import draw_grounding, guess_size, markdown, paper_table
from dsvl2.evaluation.tasks import PAPER_SUITE, TASKS, Example, Task, get_task

PREDICTIONS, SUMMARY, TABLE, RUN = "predictions.jsonl", "summary.json", "results.md", "run.json"


class Model(Protocol):
    """What the runner needs: greedy answers for a batch of conversations (``dsvl2.Pipeline``)."""

    def generate_batch(self, conversations: list[list[dict[str, Any]]], *, max_new_tokens: int = 512,
                       skip_special_tokens: bool = True, chunk_size: int | None = None) -> list[str]: ...


def read_predictions(path: Path) -> dict[str, dict[str, Any]]:
    """Records by id. An incomplete last line (a crash mid-write) is cut from the file."""
    if not path.exists():
        return {}
    data = path.read_bytes()
    good = data.rfind(b"\n") + 1  # everything after the last newline is a torn write
    if good < len(data):
        with open(path, "r+b") as f:
            f.truncate(good)
    records = {}
    for n, line in enumerate(data[:good].decode("utf-8").splitlines(), 1):
        if line.strip():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InputError(f"{path} line {n}: not JSON ({exc}); remove the line to resume") from exc
            records[str(rec["id"])] = rec
    return records


class Progress:
    """tqdm on stderr (count, rate, ETA), or a plain line every few seconds without tqdm."""

    def __init__(self, total: int, initial: int, desc: str, enabled: bool = True) -> None:
        self.total, self.n, self.desc, self.enabled = total, initial, desc, enabled
        self.start, self.last, self.initial = time.monotonic(), 0.0, initial
        try:
            from tqdm import tqdm
        except ImportError:
            self.bar = None
        else:
            self.bar = tqdm(total=total, initial=initial, desc=desc, unit="ex", file=sys.stderr,
                            disable=not enabled, dynamic_ncols=True)

    def update(self, k: int) -> None:
        self.n += k
        if self.bar is not None:
            self.bar.update(k)
            return
        now = time.monotonic()
        if self.enabled and (now - self.last >= 5 or self.n == self.total):
            self.last = now
            rate = (self.n - self.initial) / max(now - self.start, 1e-9)
            eta = (self.total - self.n) / rate if rate > 0 else float("inf")
            print(f"{self.desc}: {self.n}/{self.total} ({rate:.2f} ex/s, ETA {eta:.0f} s)", file=sys.stderr)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _batches(pending: list[Example], size: int, task: Task) -> list[list[Example]]:
    """Chunks of ``size``; examples that keep special tokens (grounding) are batched apart."""
    out = []
    for keep in (False, True):
        same = [ex for ex in pending if task.keeps_special_tokens(ex) == keep]
        out += [same[i: i + size] for i in range(0, len(same), size)]
    return out


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _check_run(out: Path, task: str, split: str, data: str) -> None:
    path = out / RUN
    if path.exists():
        previous = json.loads(path.read_text())
        if (previous.get("task"), previous.get("split")) != (task, split):
            raise InputError(f"{out} holds a run of task {previous.get('task')!r} split {previous.get('split')!r}, "
                             f"not {task!r} {split!r}: choose another --out")
    else:
        _write_atomic(path, json.dumps({"task": task, "split": split, "data": data}, indent=1) + "\n")


def evaluate(model: Model | Callable[[], Model], task: Task | str, data: str | Path, out: str | Path, *,
             split: str | None = None, limit: int | None = None, batch_size: int = 1,
             max_new_tokens: int | None = None, chunk_size: int | None = None, progress: bool = True,
             n_drawings: int = 8) -> dict[str, Any]:
    """Run (or finish) one benchmark and return its summary (also written to ``out``).

    ``model`` may be a zero-argument factory, called only if some example still needs an answer.
    ``max_new_tokens`` defaults to the task's (512, DeepSeek's VLMEvalKit setting).
    """
    task = get_task(task) if isinstance(task, str) else task
    split = split or task.default_split
    if batch_size < 1:
        raise InputError(f"--batch-size must be >= 1, got {batch_size}")
    examples = task.examples(data, split, limit)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _check_run(out, task.name, split, str(data))
    done = read_predictions(out / PREDICTIONS)
    pending = [ex for ex in examples if ex.id not in done]
    if pending:
        if not hasattr(model, "generate_batch"):
            model = model()
        bar = Progress(len(examples), len(examples) - len(pending), f"{task.name}/{split}", progress)
        try:
            with open(out / PREDICTIONS, "a", encoding="utf-8") as f:
                for batch in _batches(pending, batch_size, task):
                    keep = task.keeps_special_tokens(batch[0])
                    texts = model.generate_batch([task.prompt(ex) for ex in batch],
                                                 max_new_tokens=max_new_tokens or task.max_new_tokens,
                                                 skip_special_tokens=not keep, chunk_size=chunk_size)
                    if len(texts) != len(batch):
                        raise InputError(f"model returned {len(texts)} answers for {len(batch)} conversations")
                    for ex, text in zip(batch, texts):
                        rec = task.record(ex, text, task.postprocess(ex, text))
                        f.write(json.dumps(rec, ensure_ascii=False) + "\n")
                        f.flush()
                        done[ex.id] = rec
                    os.fsync(f.fileno())
                    bar.update(len(batch))
        finally:
            bar.close()
    records = [done[ex.id] for ex in examples]
    summary = {"task": task.name, "split": split, "data": str(data), **task.summarize(records),
               "max_new_tokens": max_new_tokens or task.max_new_tokens}
    _write_atomic(out / SUMMARY, json.dumps(summary, indent=1, ensure_ascii=False) + "\n")
    _write_atomic(out / TABLE, markdown(summary))
    grounded = [r for r in records if "pred_box" in r.get("extra", {})]
    if grounded and n_drawings > 0:
        draw_grounding(grounded, {ex.id: ex.images[0] for ex in examples}, out / "examples", n_drawings)
    return summary


class _LoadOnce:
    """A model factory that calls the wrapped one at most once (the suite shares one model)."""

    def __init__(self, factory: Callable[[], Model]) -> None:
        self.factory, self.model = factory, None

    def __call__(self) -> Model:
        if self.model is None:
            self.model = self.factory()
        return self.model


def run_suite(model: Model | Callable[[], Model], root: str | Path, out: str | Path, *, size: str | None = None,
              tasks: Sequence[str] = PAPER_SUITE, **kwargs: Any) -> dict[tuple[str, str], dict[str, Any]]:
    """Every benchmark of the paper whose data is found below ``root`` (see ``Task.suite_names``);
    writes ``paper.md`` and ``paper.json`` into ``out`` and returns the summaries."""
    root, out = Path(root), Path(out)
    if not root.is_dir():
        raise InputError(f"--data for --suite must be a folder holding the benchmark files: {root}")
    if not hasattr(model, "generate_batch"):
        model = _LoadOnce(model)
    results: dict[tuple[str, str], dict[str, Any]] = {}
    for name in tasks:
        task = get_task(name)
        for split in task.splits or (task.default_split,):
            path = task.locate(root, split)
            if path is None:
                print(f"suite: no data for {name} {split} below {root}, skipped", file=sys.stderr)
                continue
            try:
                results[(name, split)] = evaluate(model, task, path, out / f"{name}-{split}", split=split, **kwargs)
            except InputError as exc:
                print(f"suite: {name} {split} skipped: {exc}", file=sys.stderr)
    out.mkdir(parents=True, exist_ok=True)
    _write_atomic(out / "paper.md", paper_table(results, size))
    _write_atomic(out / "paper.json", json.dumps({f"{t}/{s}": v for (t, s), v in results.items()}, indent=1) + "\n")
    return results


# -------------------------------------------------------------------------------- CLI

EXAMPLES = """examples:
  python -m dsvl2.demo.tasks --out /tmp/demo --n 20 --seed 7
  dsvl2 eval --task demo --data /tmp/demo/data.jsonl --out runs/eval-demo    # the shipped demo model
  dsvl2 eval --model deepseek-vl2-tiny --task chartqa --data LMUData/ChartQA_TEST.tsv --limit 100 --out runs/chartqa
  dsvl2 eval --model deepseek-vl2-small --task docvqa --data hf/DocVQA --split validation --out runs/docvqa
  dsvl2 eval --model deepseek-vl2-small --suite paper --data LMUData --out runs/paper

--data: a VLMEvalKit .tsv, a parquet file or folder (Hugging Face copy), or the demo data.jsonl.
Re-running the same command resumes: answers already in OUT/predictions.jsonl are kept."""


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``dsvl2 eval`` flags (also used by ``python -m dsvl2.evaluation``)."""
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EXAMPLES
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
    """``python -m dsvl2.evaluation``: the same flags as ``dsvl2 eval``."""
    parser = argparse.ArgumentParser(prog="dsvl2 eval", description="Evaluate a model on a benchmark.",
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_eval_arguments(parser)
    parser.epilog = f"{parser.epilog}\n\n{EXIT_HELP}"
    return run_command("dsvl2 eval", eval_main, parser.parse_args(argv))

