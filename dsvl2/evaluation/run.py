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
``dsvl2.load``; ``dsvl2 eval`` (``dsvl2/cli/eval.py``) wires its flags to these functions.
"""

import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

from dsvl2.errors import InputError
from dsvl2.evaluation.report import draw_grounding, markdown, paper_table
from dsvl2.evaluation.tasks import PAPER_SUITE, Example, Task, get_task

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
