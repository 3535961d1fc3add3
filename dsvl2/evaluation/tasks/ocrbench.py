"""OCRBench (v1): 1000 questions, scored as the number answered correctly (0-1000).

Data (eval-datasets.md 3.5): ``echo840/OCRBench`` parquet (``question_type``, ``dataset``,
``answer`` list) or VLMEvalKit ``OCRBench.tsv`` (``category`` = question type, ``answer`` list
literal). Prompt ``<image>\\n{question}`` (no suffix). Rule :func:`metrics.ocrbench_match`; the
summary reproduces VLMEvalKit ``OCRBench.evaluate``: six recognition types summed as "Text
Recognition", four other groups, "Final Score" = the total (out of 1000 on the full set).
"""

from collections.abc import Sequence
from typing import Any

from dsvl2.evaluation.data import Table, cell, string_list
from dsvl2.evaluation.metrics import HMER
from dsvl2.evaluation.tasks.base import Example, Task, row_id, single_image

RECOGNITION = ("Regular Text Recognition", "Irregular Text Recognition", "Artistic Text Recognition",
               "Handwriting Recognition", "Digit String Recognition", "Non-Semantic Text Recognition")
GROUPS = ("Text Recognition", "Scene Text-centric VQA", "Doc-oriented VQA", "Key Information Extraction", HMER)


class OCRBench(Task):
    name = "ocrbench"
    metric = "correct answers (of 1000)"
    default_split = "test"
    suite_names = ("OCRBench.tsv", "OCRBench", "echo840_OCRBench")

    def from_table(self, table: Table, split: str) -> list[Example]:
        tsv = table.kind == "tsv"
        type_col = "category" if tsv else "question_type"
        table.require("image", "question", "answer", type_col, *(["index"] if tsv else []))
        out = []
        for i, row in enumerate(table.rows):
            qtype = str(cell(row[type_col]) or "")
            extra = {"question_type": qtype}
            if not tsv and cell(row.get("dataset")) is not None:
                extra["dataset"] = str(row["dataset"])
            out.append(Example(
                id=row_id(table, i, "index" if tsv else None),
                images=single_image(table, i),
                question=str(row["question"]),
                answers=string_list(row["answer"], table.where(i)),
                categories={"question_type": [qtype], "group": [group_of(qtype)]},
                extra=extra,
                where=table.where(i),
            ))
        return out

    def user_text(self, ex: Example) -> str:
        return f"<image>\n{ex.question}"

    def aggregate(self, records: Sequence[dict[str, Any]]) -> float:
        """The count of correct answers (OCRBench reports a sum, not a mean)."""
        return float(sum(r["score"] for r in records))

    def summarize(self, records: Sequence[dict[str, Any]]) -> dict[str, Any]:
        summary = super().summarize(records)
        summary["final_score_norm"] = summary["score"] / 10  # VLMEvalKit's "Final Score Norm"
        return summary


def group_of(question_type: str) -> str:
    """The five reported groups: the six recognition types are summed as "Text Recognition"."""
    return "Text Recognition" if question_type in RECOGNITION else question_type
