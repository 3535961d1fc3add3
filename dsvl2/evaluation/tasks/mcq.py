"""Multiple-choice benchmarks scored by letter extraction: AI2D, MMStar, MMBench (CircularEval).

Data (eval-datasets.md 3.6-3.8): VLMEvalKit ``AI2D_TEST.tsv``, ``MMStar.tsv``, ``MMBench_DEV_EN.tsv``
(option columns ``A``, ``B``, ...; empty cell = no option) or the parquet copies: ``lmms-lab/ai2d``
(``options`` list, ``answer`` = 0-based index), ``Lin-Chen/MMStar`` (options inside the question
text, ``…\\nOptions: A: …, B: …``), ``lmms-lab/MMBench`` config ``en``.

Prompt: VLMEvalKit's MCQ template, which DeepSeek's wrapper uses unchanged (``<image>\\n`` + optional
``Hint:`` + ``Question:`` + ``Options:`` + one ``X. text`` line per option + ``Please select the
correct answer from the options above.``). Score: :func:`metrics.extract_choice` (VLMEvalKit exact
matching, no LLM judge; a failure is wrong). MMBench: CircularEval -- a question counts only if
every rotated copy (same ``index mod 1e6``, or ``g_index``) is right.

Deviation: an MMStar parquet question whose embedded options do not parse keeps its full text and
gets lmms-eval's MMStar prompt (``{question}\\nAnswer with the option's letter from the given
choices directly``), with the letters A-D scored by the option pass only.
"""

import re
import string
from collections.abc import Sequence
from typing import Any

from dsvl2.errors import InputError
from dsvl2.evaluation.data import Table, cell
from dsvl2.evaluation.tasks.base import Example, Task, breakdown, mcq_body, row_id, single_image, tags

LETTERS = string.ascii_uppercase


class MCQTask(Task):
    """Shared loader for the VLMEvalKit TSV layout and parquet copies with ``A``.. columns."""

    id_column: str | None = "index"
    # column spellings of the layouts -> breakdown name
    category_columns: tuple[tuple[str, str], ...] = (
        ("category", "category"), ("l2-category", "l2-category"), ("L2-category", "l2-category"),
        ("l2_category", "l2-category"))

    def from_table(self, table: Table, split: str) -> list[Example]:
        table.require("image", "question", "answer", *(["index"] if table.kind == "tsv" else []))
        out = []
        for i, row in enumerate(table.rows):
            options, question, answer = self.options_of(table, i)
            ex = Example(
                id=row_id(table, i, "index" if table.kind == "tsv" else self.id_column),
                images=single_image(table, i),
                question=question,
                answers=answer,
                options=options,
                hint=None if cell(row.get("hint")) is None else str(row["hint"]),
                where=table.where(i),
            )
            for column, name in self.category_columns:
                if table.has(column) and tags(cell(row[column])):
                    ex.categories[name] = tags(cell(row[column]))
            out.append(ex)
        return out

    def options_of(self, table: Table, i: int) -> tuple[dict[str, str | None], str, str]:
        """(options, question, gold letter) of row ``i``: options from the letter columns."""
        row = table.rows[i]
        options = {k: str(row[k]) for k in LETTERS if table.has(k) and cell(row[k]) is not None}
        if not options:
            raise InputError(f"{table.where(i)}: no option columns (A, B, ...) with text")
        return options, str(row["question"]), str(row["answer"]).strip()

    def user_text(self, ex: Example) -> str:
        return "<image>\n" + mcq_body(ex.question, ex.options, ex.hint)


class AI2D(MCQTask):
    name = "ai2d"
    metric = "accuracy x 100"
    default_split = "test"
    suite_names = ("AI2D_TEST.tsv", "ai2d", "AI2D", "lmms-lab_ai2d")
    id_column = None  # the parquet copy has no id column: row numbers

    def options_of(self, table: Table, i: int) -> tuple[dict[str, str | None], str, str]:
        row = table.rows[i]
        if table.kind == "tsv":
            return super().options_of(table, i)
        table.require("options")
        options = {LETTERS[k]: str(v) for k, v in enumerate(row["options"] or [])}
        try:
            answer = LETTERS[int(str(row["answer"]).strip())]
        except (ValueError, IndexError):
            raise InputError(f"{table.where(i)}: answer {row['answer']!r} is not an option index") from None
        return options, str(row["question"]), answer


_OPTIONS = re.compile(r"\s*Options:\s*(?=A:)")


def split_embedded_options(question: str) -> tuple[str, dict[str, str]] | None:
    """``"Q?\\nOptions: A: x, B: y, C: z"`` -> ``("Q?", {"A": "x", "B": "y", "C": "z"})``, else None."""
    found = list(_OPTIONS.finditer(question))
    if not found:
        return None
    head, tail = question[: found[-1].start()], question[found[-1].end():]
    parts = re.split(r"(?:^|,\s*)([A-Z]):\s*", tail)
    letters, texts = parts[1::2], parts[2::2]
    if parts[0] or letters != list(LETTERS[: len(letters)]) or len(letters) < 2:
        return None
    return head.rstrip(), {k: v.strip() for k, v in zip(letters, texts)}


class MMStar(MCQTask):
    name = "mmstar"
    metric = "accuracy x 100"
    default_split = "val"
    suite_names = ("MMStar.tsv", "MMStar", "mmstar", "Lin-Chen_MMStar")

    def parquet_patterns(self, split: str) -> list[str]:
        return super().parquet_patterns(split) + ["mmstar.parquet", "*.parquet"]

    def options_of(self, table: Table, i: int) -> tuple[dict[str, str | None], str, str]:
        row = table.rows[i]
        if any(table.has(k) for k in "ABCD"):
            return super().options_of(table, i)
        question = str(row["question"])
        parsed = split_embedded_options(question)
        if parsed is None:
            return dict.fromkeys("ABCD"), question, str(row["answer"]).strip()
        return parsed[1], parsed[0], str(row["answer"]).strip()

    def user_text(self, ex: Example) -> str:
        if any(text is None for text in ex.options.values()):
            return f"<image>\n{ex.question.strip()}\nAnswer with the option's letter from the given choices directly"
        return super().user_text(ex)


class MMBench(MCQTask):
    """MMBench dev (English) with CircularEval over the rotated copies."""

    name = "mmbench"
    metric = "CircularEval accuracy x 100"
    default_split = "dev"
    parquet_dirs = ("en", "data")
    suite_names = ("MMBench_DEV_EN.tsv", "MMBench", "lmms-lab_MMBench")

    def from_table(self, table: Table, split: str) -> list[Example]:
        table.require("index")
        exs = super().from_table(table, split)
        for ex, row in zip(exs, table.rows):
            if table.has("g_index") and cell(row["g_index"]) is not None:
                ex.group = str(row["g_index"])
            else:
                try:
                    ex.group = str(int(str(row["index"]).strip()) % 1_000_000)
                except ValueError:
                    raise InputError(f"{ex.where}: index {row['index']!r} is not an integer") from None
        return exs

    def summarize(self, records: Sequence[dict[str, Any]]) -> dict[str, Any]:
        groups = circular_groups(records)
        return {"metric": self.metric, "n": len(groups), "rows": len(records),
                "score": self.aggregate(groups), "breakdown": breakdown(groups, self.aggregate)}


def circular_groups(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One record per group: score 1 iff every copy scored 1; categories of the main row
    (the copy whose id equals the group id, else the first)."""
    by_group: dict[str, list[dict[str, Any]]] = {}
    for rec in records:
        by_group.setdefault(str(rec.get("group", rec["id"])), []).append(rec)
    out = []
    for group, recs in by_group.items():
        main = next((r for r in recs if r["id"] == group), recs[0])
        out.append({"id": group, "score": float(all(r["score"] == 1.0 for r in recs)),
                    "categories": main.get("categories", {})})
    return out
