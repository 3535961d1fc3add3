"""Referring expression comprehension: RefCOCO, RefCOCO+, RefCOCOg (Acc@IoU 0.5).

Data (eval-datasets.md 3.10): ``lmms-lab/RefCOCO``, ``RefCOCOplus``, ``RefCOCOg`` parquet (one row
per object: ``answer`` = its expressions, ``bbox`` = COCO ``[x, y, w, h]`` pixels; exploded here to
one example per expression) or VLMEvalKit ``RefCOCO.tsv`` (one row per expression, ``category``
such as ``RefCOCO+ test-A``, expression inside ``<ref>…</ref>`` of ``question``, ``answer`` a
0-1 normalised ``[x1, y1, x2, y2]``).

Prompt (DeepSeek README, spec 9.1): ``<image>\\n<|ref|>{expression}<|/ref|>.``; decoded with special
tokens kept; the first box of the answer, 0-999 -> pixels by ``Box.to_pixels``, is a hit when its
IoU with the gold box is >= 0.5 (:func:`metrics.grounding_hit`). DeepSeek never published its
grounding evaluation; this is the standard REC protocol with their box format.

Note: lmms-lab's RefCOCO val (8811 rows) and RefCOCOg val (7573) hold 5000 rows more than the
canonical UNC/UMD splits; numbers on them are not comparable with the paper's.
"""

import ast
import re
from typing import Any

from dsvl2.errors import InputError
from dsvl2.evaluation import metrics
from dsvl2.evaluation.data import Table, string_list
from dsvl2.evaluation.tasks.base import Example, Task, single_image

_REF = re.compile(r"<ref>(.*?)</ref>", re.DOTALL)


class RefCOCO(Task):
    name = "refcoco"
    family = "RefCOCO"  # the prefix of the TSV ``category``
    metric = "Acc@IoU0.5 x 100"
    default_split = "val"
    splits = ("val", "testA", "testB")
    suite_names = ("RefCOCO.tsv", "RefCOCO", "lmms-lab_RefCOCO")
    skip_special_tokens = False

    def from_table(self, table: Table, split: str) -> list[Example]:
        return self._from_tsv(table, split) if table.kind == "tsv" else self._from_parquet(table)

    def _from_parquet(self, table: Table) -> list[Example]:
        table.require("question_id", "image", "answer", "bbox")
        out = []
        for i, row in enumerate(table.rows):
            bbox = row["bbox"]
            if not isinstance(bbox, list) or len(bbox) != 4:
                raise InputError(f"{table.where(i)}: bbox {bbox!r} is not [x, y, w, h]")
            x, y, w, h = (float(v) for v in bbox)
            for k, expression in enumerate(string_list(row["answer"], table.where(i))):
                out.append(Example(id=f"{row['question_id']}/{k}", images=single_image(table, i),
                                   question=expression, extra={"box": [x, y, x + w, y + h]},
                                   where=f"{table.where(i)} expression {k}"))
        return out

    def _from_tsv(self, table: Table, split: str) -> list[Example]:
        table.require("index", "image", "question", "answer", "category")
        out = []
        for i, row in enumerate(table.rows):
            family, _, row_split = str(row["category"]).partition(" ")
            if family != self.family or row_split.replace("-", "") != split:
                continue
            found = _REF.search(str(row["question"]))
            if found is None:
                raise InputError(f"{table.where(i)}: no <ref>…</ref> expression in question {row['question']!r}")
            try:
                box = [float(v) for v in ast.literal_eval(str(row["answer"]))]
            except (ValueError, SyntaxError, TypeError):
                box = []
            if len(box) != 4:
                raise InputError(f"{table.where(i)}: answer {row['answer']!r} is not [x1, y1, x2, y2]")
            out.append(Example(id=str(row["index"]), images=single_image(table, i), question=found.group(1).strip(),
                               extra={"box_norm": box}, where=table.where(i)))
        return out

    def user_text(self, ex: Example) -> str:
        # imported here: dsvl2.processing pulls in torch, which loading and scoring never need
        from dsvl2.processing.grounding import format_ref_prompt

        return format_ref_prompt(ex.question)

    def postprocess(self, ex: Example, text: str) -> str:
        return text  # parsed as is: the trailing-period strip is for text answers

    def score_extra(self, ex: Example) -> dict[str, Any]:
        width, height = ex.images[0].size
        if "box" in ex.extra:
            box = ex.extra["box"]
        else:
            box = [v * s for v, s in zip(ex.extra["box_norm"], (width, height, width, height))]
        return {"box": box, "width": width, "height": height}

    def score(self, ex: Example, answer: str) -> float:
        extra = self.score_extra(ex)
        return metrics.score(self.name, answer, extra.pop("box"), **extra)

    def record(self, ex: Example, prediction: str, answer: str) -> dict[str, Any]:
        rec = super().record(ex, prediction, answer)
        extra = rec.pop("extra")
        rec["answers"] = extra["box"]
        rec["extra"] = {"width": extra["width"], "height": extra["height"], "expression": ex.question,
                        "pred_box": metrics.first_box(answer, extra["width"], extra["height"])}
        return rec


class RefCOCOPlus(RefCOCO):
    name = "refcoco+"
    family = "RefCOCO+"
    suite_names = ("RefCOCO.tsv", "RefCOCOplus", "lmms-lab_RefCOCOplus")


class RefCOCOg(RefCOCO):
    name = "refcocog"
    family = "RefCOCOg"
    splits = ("val", "test")
    suite_names = ("RefCOCO.tsv", "RefCOCOg", "lmms-lab_RefCOCOg")
