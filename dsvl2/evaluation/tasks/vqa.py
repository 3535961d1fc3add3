"""Open-ended document / chart / scene-text VQA: DocVQA, InfoVQA (ANLS), ChartQA (relaxed
accuracy), TextVQA (VQA accuracy).

Data (eval-datasets.md 3.1-3.4): lmms-lab parquet (``DocVQA/``, ``InfographicVQA/`` configs of
``lmms-lab/DocVQA``; ``lmms-lab/ChartQA``; ``lmms-lab/textvqa``) or VLMEvalKit ``DocVQA_VAL.tsv``,
``InfoVQA_VAL.tsv``, ``ChartQA_TEST.tsv``, ``TextVQA_VAL.tsv``.
Prompt (VLMEvalKit, DeepSeek's protocol): ``<image>\\n{question}\\nAnswer the question using a single
word or phrase.`` for all four -- not lmms-eval's ChartQA suffix nor its TextVQA ``capitalize()``.
"""

from dsvl2.evaluation.data import Table, cell, string_list
from dsvl2.evaluation.tasks.base import Example, Task, row_id, single_image, tags, vqa_text


class VQATask(Task):
    """Shared loader: one image, a question, a list of accepted answers, optional tags."""

    id_column: str | None = None  # parquet id column
    answers_column: str = "answers"  # parquet answers column (TSV: ``answer``)
    category_column: str | None = None  # parquet breakdown column
    tsv_category_column: str | None = None

    def from_table(self, table: Table, split: str) -> list[Example]:
        tsv = table.kind == "tsv"
        answers_col = "answer" if tsv else self.answers_column
        table.require("image", "question", answers_col, *(["index"] if tsv else []))
        category_col = self.tsv_category_column if tsv else self.category_column
        out = []
        for i, row in enumerate(table.rows):
            ex = Example(
                id=row_id(table, i, "index" if tsv else self.id_column),
                images=single_image(table, i),
                question=str(row["question"]),
                answers=string_list(row[answers_col], table.where(i)),
                where=table.where(i),
            )
            if category_col and table.has(category_col):
                values = [self.category_name(v) for v in tags(cell(row[category_col]))]
                if values:
                    ex.categories = {category_col: values}
            out.append(ex)
        return out

    def category_name(self, value: str) -> str:
        return value

    def user_text(self, ex: Example) -> str:
        return vqa_text(ex.question)


class DocVQA(VQATask):
    name = "docvqa"
    metric = "ANLS x 100"
    default_split = "validation"
    parquet_dirs = ("DocVQA", "data")
    suite_names = ("DocVQA_VAL.tsv", "DocVQA", "lmms-lab_DocVQA")
    id_column = "questionId"
    category_column = "question_types"


class InfoVQA(VQATask):
    name = "infovqa"
    metric = "ANLS x 100"
    default_split = "validation"
    parquet_dirs = ("InfographicVQA",)  # not "data": below a DocVQA root that would be DocVQA
    suite_names = ("InfoVQA_VAL.tsv", "InfographicVQA", "DocVQA", "lmms-lab_DocVQA")
    id_column = "questionId"
    category_column = "answer_type"


class ChartQA(VQATask):
    """Relaxed accuracy over human + augmented; per-split numbers under ``split``."""

    name = "chartqa"
    metric = "relaxed accuracy x 100"
    default_split = "test"
    suite_names = ("ChartQA_TEST.tsv", "ChartQA", "lmms-lab_ChartQA")
    answers_column = "answer"
    category_column = "type"
    tsv_category_column = "split"

    def from_table(self, table: Table, split: str) -> list[Example]:
        exs = super().from_table(table, split)
        for ex in exs:  # parquet "type" and TSV "split" both become "split"
            if "type" in ex.categories:
                ex.categories = {"split": ex.categories.pop("type")}
        return exs

    def category_name(self, value: str) -> str:
        """``human_test`` (parquet) / ``test_human`` (TSV) -> ``human``; same for augmented."""
        for short in ("human", "augmented"):
            if value in (f"{short}_test", f"test_{short}"):
                return short
        return value


class TextVQA(VQATask):
    name = "textvqa"
    metric = "VQA accuracy x 100"
    default_split = "validation"
    suite_names = ("TextVQA_VAL.tsv", "textvqa", "TextVQA", "lmms-lab_textvqa")
    id_column = "question_id"
