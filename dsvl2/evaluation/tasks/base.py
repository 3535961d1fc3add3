"""What every benchmark shares: the :class:`Example` record, the :class:`Task` recipe, prompt
helpers for DeepSeek's VLMEvalKit wrapper and the default summary (mean x 100, per category).

A task reads like a recipe: ``examples(path, split, limit)`` says where the examples come from,
``prompt(ex)`` builds the conversation DeepSeek-VL2 is evaluated with (eval-datasets.md 2.1),
``score(ex, answer)`` applies the community rule of :mod:`dsvl2.evaluation.metrics`, and
``summarize(records)`` turns the per-example JSONL records into the reported numbers.
"""

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from dsvl2.errors import InputError
from dsvl2.evaluation import metrics
from dsvl2.evaluation.data import ImageRef, Table, find_parquet, open_table

Conversation = list[dict[str, Any]]

VQA_SUFFIX = "Answer the question using a single word or phrase."
MCQ_SUFFIX = "Please select the correct answer from the options above. \n"


@dataclass
class Example:
    """One benchmark question, normalised across file layouts (eval-datasets.md section 5)."""

    id: str
    images: list[ImageRef]
    question: str = ""
    answers: Any = field(default_factory=list)  # gold strings; a letter for MCQ; a pixel box for grounding
    options: dict[str, str | None] = field(default_factory=dict)  # letter -> text, in letter order
    hint: str | None = None
    categories: dict[str, list[str]] = field(default_factory=dict)  # breakdown -> values (tags)
    group: str | None = None  # MMBench circular group; --limit counts groups
    extra: dict[str, Any] = field(default_factory=dict)  # JSON-able fields the scorer needs
    where: str = ""  # file and row, for error messages


class Task:
    """A benchmark recipe. Subclasses set the class attributes and implement ``from_table``."""

    name: str = ""
    metric: str = ""  # what the summary number is, e.g. "ANLS x 100"
    default_split: str = "test"
    splits: tuple[str, ...] = ()  # the splits the paper suite runs (default: default_split)
    parquet_dirs: tuple[str, ...] = ("data",)  # folders tried, in order, below a parquet root
    suite_names: tuple[str, ...] = ()  # files / folders looked for by ``--suite`` below a data root
    max_new_tokens: int = 512  # DeepSeek's VLMEvalKit wrapper (PR #697); 2048 since 2025-02
    skip_special_tokens: bool = True

    # ---------------------------------------------------------------- data
    def parquet_patterns(self, split: str) -> list[str]:
        return [f"{d}/{split}-*.parquet" for d in self.parquet_dirs] + [f"{split}-*.parquet"]

    def examples(self, path: str | Path, split: str | None = None, limit: int | None = None) -> list[Example]:
        """The examples of ``split`` in file order, the first ``limit`` of them (or groups)."""
        split = split or self.default_split
        table = open_table(path, self.parquet_patterns(split))
        exs = self.from_table(table, split)
        if not exs:
            raise InputError(f"{table.source}: no {self.name} examples for split {split!r}")
        seen: dict[str, str] = {}
        for ex in exs:
            if ex.id in seen:
                raise InputError(f"{ex.where}: duplicate example id {ex.id!r} (also {seen[ex.id]})")
            seen[ex.id] = ex.where
        return limit_examples(exs, limit)

    def from_table(self, table: Table, split: str) -> list[Example]:
        raise NotImplementedError

    def locate(self, root: Path, split: str | None = None) -> Path | None:
        """The data of this task below ``root`` (names compared case-insensitively), or None."""
        split = split or self.default_split
        if not root.is_dir():
            return None
        entries = {p.name.lower(): p for p in root.iterdir()}
        for name in self.suite_names:
            path = entries.get(name.lower())
            if path is None:
                continue
            if path.is_file():
                return path
            try:
                find_parquet(path, self.parquet_patterns(split))
            except InputError:
                continue
            return path
        return None

    # ---------------------------------------------------------------- model side
    def user_text(self, ex: Example) -> str:
        raise NotImplementedError

    def prompt(self, ex: Example) -> Conversation:
        """One user turn (the processor adds the empty assistant turn and strips the content)."""
        return [{"role": "user", "content": self.user_text(ex).strip(), "images": [im.load() for im in ex.images]}]

    def keeps_special_tokens(self, ex: Example) -> bool:
        return not self.skip_special_tokens

    def postprocess(self, ex: Example, text: str) -> str:
        """DeepSeek's wrapper: remove every trailing ``.`` (eval-datasets.md 2, item 6)."""
        return text.rstrip(".")

    # ---------------------------------------------------------------- scoring
    def score_extra(self, ex: Example) -> dict[str, Any]:
        return dict(ex.extra, choices=ex.options) if ex.options else dict(ex.extra)

    def score(self, ex: Example, answer: str) -> float:
        return metrics.score(self.name, answer, ex.answers, **self.score_extra(ex))

    def record(self, ex: Example, prediction: str, answer: str) -> dict[str, Any]:
        """The JSONL line of one example: everything the summary and a re-score need."""
        rec: dict[str, Any] = {"id": ex.id, "prediction": prediction, "answer": answer,
                               "score": self.score(ex, answer), "answers": ex.answers}
        if ex.categories:
            rec["categories"] = ex.categories
        if ex.group is not None:
            rec["group"] = ex.group
        extra = self.score_extra(ex)
        if extra:
            rec["extra"] = extra
        return rec

    def summarize(self, records: Sequence[dict[str, Any]]) -> dict[str, Any]:
        """Overall score and one table per breakdown (e.g. ``category``), from JSONL records."""
        return {"metric": self.metric, "n": len(records), "score": self.aggregate(records),
                "breakdown": breakdown(records, self.aggregate)}

    def aggregate(self, records: Sequence[dict[str, Any]]) -> float:
        return mean_percent(records)


def mean_percent(records: Sequence[dict[str, Any]]) -> float:
    return 100.0 * sum(r["score"] for r in records) / len(records) if records else 0.0


def breakdown(records: Sequence[dict[str, Any]], aggregate: Any) -> dict[str, dict[str, dict[str, Any]]]:
    """{breakdown name: {value: {"n", "score"}}}; a record counts once under each of its tags."""
    groups: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for rec in records:
        for name, values in rec.get("categories", {}).items():
            for value in values:
                groups.setdefault(name, {}).setdefault(value, []).append(rec)
    return {name: {value: {"n": len(recs), "score": aggregate(recs)} for value, recs in sorted(values.items())}
            for name, values in groups.items()}


def limit_examples(exs: list[Example], limit: int | None) -> list[Example]:
    """The first ``limit`` examples; with groups (MMBench copies), every example of the first
    ``limit`` groups."""
    if limit is None:
        return exs
    if all(ex.group is None for ex in exs):
        return exs[:limit]
    kept: set[str | None] = set()
    out = []
    for ex in exs:
        if ex.group not in kept and len(kept) >= limit:
            continue
        kept.add(ex.group)
        out.append(ex)
    return out


# -------------------------------------------------------------------- helpers for from_table


def row_id(table: Table, i: int, column: str | None) -> str:
    """The example id: ``column``'s value, or the row number when the layout has no id."""
    row = table.rows[i]
    if column and table.has(column) and row.get(column) not in (None, ""):
        return str(row[column])
    return str(row["_row"])


def single_image(table: Table, i: int, column: str = "image") -> list[ImageRef]:
    value = table.rows[i].get(column)
    if value is None:
        raise InputError(f"{table.where(i)}: no image in column {column!r}")
    return value if isinstance(value, list) else [value]


def tags(value: Any) -> list[str]:
    """A category cell as a list of tags (None -> [], list -> as is, text -> [text])."""
    if value is None or value == "":
        return []
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value]
    return [str(value)]


def vqa_text(question: str) -> str:
    """DocVQA / InfoVQA / ChartQA / TextVQA in VLMEvalKit (the DeepSeek protocol)."""
    return f"<image>\n{question}\n{VQA_SUFFIX}"


def mcq_body(question: str, options: dict[str, str | None], hint: str | None) -> str:
    """VLMEvalKit ``ImageMCQDataset.build_prompt`` text (without the image)."""
    text = f"Hint: {hint}\n" if hint is not None else ""
    text += f"Question: {question}\n"
    if options:
        text += "Options:\n" + "".join(f"{k}. {v}\n" for k, v in options.items()) + MCQ_SUFFIX
    return text


def upscale2x(image: Image.Image) -> Image.Image:
    """The MMMU path of DeepSeek's wrapper: first image resized 2x, bilinear."""
    return image.resize((2 * image.width, 2 * image.height), Image.BILINEAR)
