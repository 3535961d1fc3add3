"""MMMU (validation, 900 questions): DeepSeek's own MMMU path of the VLMEvalKit wrapper.

Data (eval-datasets.md 3.9): ``MMMU/MMMU`` (one folder per subject) or ``lmms-lab/MMMU`` parquet
(``options`` a Python-literal list, ``image_1`` .. ``image_7``), or VLMEvalKit ``MMMU_DEV_VAL.tsv``
(rows of the ``split`` column equal to ``--split`` are kept; the default ``validation``).

Prompt (eval-datasets.md 2, item 3): VLMEvalKit's MCQ text; ``<image k>`` placeholders replaced by
the images in place (``split_MMMU``); then the wrapper writes each image as ``<image j>`` (renumbered
in order of appearance), prefixes ``<image>`` x n + ``\\n`` and rewrites the instruction; the first
image is upscaled 2x (bilinear).

Score: VLMEvalKit's MCQ matching (:func:`metrics.extract_choice`); an open question becomes the
2-option MCQ {A: gold text, B: "Other Answers"} (``MMMU_preproc``). Deviation from lmms-eval and the
official MMMU parser, which pick a random letter when nothing matches: not reproducible, and not
the protocol of DeepSeek's numbers.
"""

import ast
import re
from typing import Any

from dsvl2.errors import InputError
from dsvl2.evaluation.data import ImageRef, Table, cell
from dsvl2.evaluation.tasks.base import Conversation, Example, Task, mcq_body, row_id, tags, upscale2x
from dsvl2.evaluation.tasks.mcq import LETTERS

DISCIPLINES = {
    "Art and Design": ("Art", "Art_Theory", "Design", "Music"),
    "Business": ("Accounting", "Economics", "Finance", "Manage", "Marketing"),
    "Science": ("Biology", "Chemistry", "Geography", "Math", "Physics"),
    "Health and Medicine": ("Basic_Medical_Science", "Clinical_Medicine", "Diagnostics_and_Laboratory_Medicine",
                            "Pharmacy", "Public_Health"),
    "Humanities and Social Science": ("History", "Literature", "Sociology", "Psychology"),
    "Tech and Engineering": ("Agriculture", "Architecture_and_Engineering", "Computer_Science", "Electronics",
                             "Energy_and_Power", "Materials", "Mechanical_Engineering"),
}
DISCIPLINE_OF = {subject: d for d, subjects in DISCIPLINES.items() for subject in subjects}
_PLACEHOLDER = re.compile(r"<image (\d)>")  # split_MMMU reads one digit after "<image "


class MMMU(Task):
    name = "mmmu"
    metric = "accuracy x 100"
    default_split = "validation"
    parquet_dirs = ("data", "*")
    suite_names = ("MMMU_DEV_VAL.tsv", "MMMU", "lmms-lab_MMMU")

    def from_table(self, table: Table, split: str) -> list[Example]:
        tsv = table.kind == "tsv"
        table.require("question", "answer", *(["index", "image"] if tsv else ["id", "options"]))
        out = []
        for i, row in enumerate(table.rows):
            if tsv and table.has("split") and str(row["split"]) != split:
                continue
            where = table.where(i)
            if tsv:
                options = {k: str(row[k]) for k in LETTERS if table.has(k) and cell(row[k]) is not None}
                images = row["image"] if isinstance(row["image"], list) else [row["image"]]
                subject = str(cell(row.get("category")) or "")
                discipline = str(cell(row.get("l2-category")) or DISCIPLINE_OF.get(subject, ""))
            else:
                options = {LETTERS[k]: str(v) for k, v in enumerate(_literal_list(row["options"], where))}
                images = _numbered_images(table, i)
                subject = _subject(str(row["id"]))
                discipline = DISCIPLINE_OF.get(subject, "")
            qtype = str(cell(row.get("question_type")) or ("multiple-choice" if options else "open"))
            if qtype == "open":
                options = {}
            out.append(Example(
                id=row_id(table, i, "index" if tsv else "id"),
                images=images,
                question=str(row["question"]),
                answers=str(row["answer"]).strip() if options else str(row["answer"]),
                options=options,
                hint=None if cell(row.get("hint")) is None else str(row["hint"]),
                categories={k: v for k, v in (("subject", tags(subject)), ("discipline", tags(discipline))) if v},
                extra={"question_type": qtype},
                where=where,
            ))
        return out

    def interleave(self, ex: Example) -> tuple[str, list[ImageRef]]:
        """DeepSeek's content string and the images in the order their ``<image>`` tokens take."""
        body = mcq_body(ex.question, ex.options, ex.hint)
        pieces = _PLACEHOLDER.split(body)
        if len(pieces) == 1:  # no placeholder: images stay in front of the text
            items: list[Any] = list(ex.images) + [body]
        else:
            items = [pieces[0]]
            for k, text in zip(pieces[1::2], pieces[2::2]):
                if not 1 <= int(k) <= len(ex.images):
                    raise InputError(f"{ex.where}: question refers to <image {k}>, row has {len(ex.images)} image(s)")
                items += [ex.images[int(k) - 1], text]
        content, images = "", []
        for item in items:
            if isinstance(item, ImageRef):
                images.append(item)
                content += f"<image {len(images)}>"
            else:
                content += item
        content = "<image>" * len(images) + "\n" + content
        content = content.replace(
            "Please select the correct answer from the options above.",
            "Answer with the option's letter from the given choices directly. "
            "Answer the question using a single word or phrase.\n")
        content = content.replace("Question:", "").replace("Options:\n", "")
        return content, images

    def user_text(self, ex: Example) -> str:
        return self.interleave(ex)[0]

    def prompt(self, ex: Example) -> Conversation:
        content, refs = self.interleave(ex)
        loaded: dict[int, Any] = {}
        images = [loaded.setdefault(id(ref), ref.load()) for ref in refs]
        if images:
            images[0] = upscale2x(images[0])
        return [{"role": "user", "content": content.strip(), "images": images}]


def _literal_list(value: Any, where: str) -> list[str]:
    if isinstance(value, list):
        return [str(v) for v in value]
    if cell(value) is None:
        return []
    try:
        parsed = ast.literal_eval(str(value))
    except (ValueError, SyntaxError):
        raise InputError(f"{where}: options {value!r} is not a Python list literal") from None
    if not isinstance(parsed, list):
        raise InputError(f"{where}: options {value!r} is not a list")
    return [str(v) for v in parsed]


def _numbered_images(table: Table, i: int) -> list[ImageRef]:
    """``image_1``, ``image_2``, ... up to the last present one; a gap is an error."""
    row = table.rows[i]
    present = [row.get(f"image_{k}") for k in range(1, 8)]
    while present and present[-1] is None:
        present.pop()
    if any(ref is None for ref in present):
        raise InputError(f"{table.where(i)}: image columns are not contiguous from image_1")
    return present


def _subject(example_id: str) -> str:
    """``validation_Art_Theory_12`` -> ``Art_Theory``."""
    parts = example_id.split("_")
    return "_".join(parts[1:-1]) if len(parts) >= 3 else ""
