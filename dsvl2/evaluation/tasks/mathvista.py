"""MathVista (testmini, 1000 questions): math reasoning over figures, scored with the official rules.

Data: HF ``AI4Math/MathVista`` parquet, split ``testmini`` (``data/testmini-*.parquet``; ``test``
has no answers), one row per question: ``pid``, ``query`` (the full prompt: hint, question and, for
multiple choice, the ``(A) ...`` options), ``decoded_image`` (the figure; ``image`` is only its file
name), ``choices`` (list or null), ``answer`` (a choice's TEXT for multiple choice), ``question_type``
(``multi_choice`` | ``free_form``), ``answer_type`` (``integer`` | ``float`` | ``text`` | ``list``),
``precision`` (decimals of a float answer), ``metadata`` (``task``, ``skills``, ``source``,
``category``, ``grade``, ...). Or VLMEvalKit ``MathVista_MINI.tsv``: ``index``, ``image``,
``question`` (the same query text), ``answer``, ``choices`` (a list literal), ``question_type``,
``answer_type``, ``precision``, and ``task`` / ``skills`` where present (column set not confirmed
against the released file).

Prompt: ``<image>\\n{query}`` (VLMEvalKit feeds the query as the question; DeepSeek's wrapper puts the
image first). Score: :func:`dsvl2.evaluation.mathvista.mathvista_match` (official extraction rules,
an offline rule in place of the GPT-4 extractor; see docs/evaluation.md). Accuracy x 100, per task
and per skill.
"""

from __future__ import annotations

import ast
from typing import Any

from dsvl2.errors import InputError
from dsvl2.evaluation.data import Table, cell
from dsvl2.evaluation.tasks.base import Example, Task, row_id, single_image, tags


def _choices(value: Any, where: str) -> list[str] | None:
    value = cell(value)
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            raise InputError(f"{where}: choices {value[:80]!r} is not a list") from None
    if not isinstance(value, (list, tuple)):
        raise InputError(f"{where}: choices must be a list, got {type(value).__name__}")
    return [str(v) for v in value]


def _precision(value: Any) -> int | None:
    value = cell(value)
    return None if value is None else int(float(value))


class MathVista(Task):
    name = "mathvista"
    metric = "accuracy x 100"
    default_split = "testmini"
    suite_names = ("MathVista_MINI.tsv", "MathVista", "AI4Math_MathVista")
    max_new_tokens = 512

    def from_table(self, table: Table, split: str) -> list[Example]:
        tsv = table.kind == "tsv"
        text_col, image_col = ("question", "image") if tsv else ("query", "decoded_image")
        table.require(image_col, text_col, "answer", "question_type", "answer_type")
        out = []
        for i, row in enumerate(table.rows):
            where = table.where(i)
            qtype, atype = str(row["question_type"]), str(row["answer_type"])
            if qtype not in ("multi_choice", "free_form"):
                raise InputError(f"{where}: question_type {qtype!r} is not multi_choice or free_form")
            choices = _choices(row.get("choices"), where)
            if qtype == "multi_choice" and not choices:
                raise InputError(f"{where}: a multi_choice question without choices")
            meta = row.get("metadata") if isinstance(row.get("metadata"), dict) else row
            ex = Example(id=row_id(table, i, "index" if tsv else "pid"), images=single_image(table, i, image_col),
                         question=str(row[text_col]), answers=[str(row["answer"])], where=where,
                         extra={"question_type": qtype, "answer_type": atype, "choices": choices,
                                "precision": _precision(row.get("precision"))})
            categories = {name: tags(cell(meta.get(name))) for name in ("task", "skills") if meta.get(name) is not None}
            ex.categories = {k: v for k, v in categories.items() if v}
            if tsv:  # TSV list cells come as literals
                ex.categories = {k: [t for v in vals for t in _literal_tags(v)] for k, vals in ex.categories.items()}
            out.append(ex)
        return out

    def user_text(self, ex: Example) -> str:
        return f"<image>\n{ex.question}"


def _literal_tags(value: str) -> list[str]:
    if value.startswith("[") and value.endswith("]"):
        try:
            parsed = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            return [value]
        return [str(v) for v in parsed] if isinstance(parsed, (list, tuple)) else [value]
    return [value]
