"""The demo model's three tasks (training issue): grounding, reading, charts.

Data: ``data.jsonl`` written by :func:`dsvl2.demo.tasks.write_dataset` -- one line per example
``{id, task: demo_grounding|demo_reading|demo_charts, image (relative path), prompt, answer,
width, height, box (inclusive pixels, grounding only)}``. ``--task demo`` runs all three;
``--task demo_reading`` (etc.) one of them.

Prompt: the line's ``prompt`` as written. Score: grounding IoU >= 0.5 of the first box against
``box`` (special tokens kept); reading exact match, case-insensitive, stripped; charts exact
integer match. No trailing-period strip (that is DeepSeek's VLMEvalKit wrapper, not the demo's).
"""

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from dsvl2.errors import InputError
from dsvl2.evaluation import metrics
from dsvl2.evaluation.data import Table
from dsvl2.evaluation.tasks.base import Example, Task, single_image

KINDS = ("demo_grounding", "demo_reading", "demo_charts")


def example(row: Mapping[str, Any], where: str = "") -> Example:
    """One ``data.jsonl`` row (:func:`dsvl2.demo.tasks.eval_row`) as an example without its image: the
    form :meth:`Demo.score` scores, also used by the demo build's held-out scores."""
    kind = row["task"]
    if kind not in KINDS:
        raise InputError(f"{where}: task {kind!r} is not one of {', '.join(KINDS)}")
    extra: dict[str, Any] = {"task": kind, "width": int(row["width"]), "height": int(row["height"])}
    answers: Any = str(row["answer"])
    if kind == "demo_grounding":
        if not isinstance(row.get("box"), list) or len(row["box"]) != 4:
            raise InputError(f"{where}: grounding row needs box [x1, y1, x2, y2], got {row.get('box')!r}")
        answers = [float(v) for v in row["box"]]
    return Example(id=str(row["id"]), images=[], question=str(row["prompt"]), answers=answers,
                   categories={"task": [kind]}, extra=extra, where=where)


class Demo(Task):
    name = "demo"
    metric = "accuracy x 100"
    default_split = "all"
    only: str | None = None  # one of KINDS, or None for all

    def parquet_patterns(self, split: str) -> list[str]:
        return ["data.jsonl"]

    def examples(self, path: Any, split: str | None = None, limit: int | None = None) -> list[Example]:
        path = Path(path)
        if path.is_dir():
            path = path / "data.jsonl"
        if path.suffix != ".jsonl":
            raise InputError(f"{path}: the demo tasks read a data.jsonl file")
        return super().examples(path, split, limit)

    def from_table(self, table: Table, split: str) -> list[Example]:
        table.require("id", "task", "image", "prompt", "answer", "width", "height")
        out = []
        for i, row in enumerate(table.rows):
            kind = row["task"]
            if kind not in KINDS:
                raise InputError(f"{table.where(i)}: task {kind!r} is not one of {', '.join(KINDS)}")
            if self.only is not None and kind != self.only:
                continue
            ex = example(row, table.where(i))
            out.append(dataclasses.replace(ex, images=single_image(table, i)))
        return out

    def user_text(self, ex: Example) -> str:
        return ex.question

    def keeps_special_tokens(self, ex: Example) -> bool:
        return ex.extra["task"] == "demo_grounding"

    def postprocess(self, ex: Example, text: str) -> str:
        return text

    def score(self, ex: Example, answer: str) -> float:
        extra = {k: v for k, v in ex.extra.items() if k != "task"}
        return metrics.score(ex.extra["task"], answer, ex.answers, **extra)

    def record(self, ex: Example, prediction: str, answer: str) -> dict[str, Any]:
        rec = super().record(ex, prediction, answer)
        if ex.extra["task"] == "demo_grounding":
            rec["extra"]["pred_box"] = metrics.first_box(answer, ex.extra["width"], ex.extra["height"])
        return rec


class DemoKind(Demo):
    """One of the three demo tasks alone."""

    def __init__(self, kind: str) -> None:
        self.name = self.only = kind
