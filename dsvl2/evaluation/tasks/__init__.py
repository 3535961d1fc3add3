"""The benchmark registry: one :class:`~dsvl2.evaluation.tasks.base.Task` per ``--task`` name.

Families: :mod:`.vqa` (docvqa, infovqa, chartqa, textvqa), :mod:`.ocrbench`, :mod:`.mcq` (ai2d,
mmstar, mmbench), :mod:`.mmmu`, :mod:`.mathvista`, :mod:`.refcoco` (refcoco, refcoco+, refcocog), :mod:`.demo`.
"""

from dsvl2.errors import InputError
from dsvl2.evaluation.tasks.base import Example, Task
from dsvl2.evaluation.tasks.demo import KINDS, Demo, DemoKind
from dsvl2.evaluation.tasks.mathvista import MathVista
from dsvl2.evaluation.tasks.mcq import AI2D, MMBench, MMStar
from dsvl2.evaluation.tasks.mmmu import MMMU
from dsvl2.evaluation.tasks.ocrbench import OCRBench
from dsvl2.evaluation.tasks.refcoco import RefCOCO, RefCOCOg, RefCOCOPlus
from dsvl2.evaluation.tasks.vqa import ChartQA, DocVQA, InfoVQA, TextVQA

# the paper suite's order: OCR-related, general, grounding (eval-datasets.md 2.2, spec 3.10)
PAPER_SUITE: tuple[str, ...] = ("docvqa", "chartqa", "infovqa", "textvqa", "ocrbench", "mmstar", "ai2d", "mmmu",
                                "mmbench", "mathvista", "refcoco", "refcoco+", "refcocog")

TASKS: dict[str, Task] = {t.name: t for t in (
    DocVQA(), InfoVQA(), ChartQA(), TextVQA(), OCRBench(), AI2D(), MMStar(), MMBench(), MMMU(), MathVista(),
    RefCOCO(), RefCOCOPlus(), RefCOCOg(), Demo(), *(DemoKind(k) for k in KINDS),
)}


def get_task(name: str) -> Task:
    """The task registered as ``name`` (case-insensitive); the error lists the known names."""
    task = TASKS.get(name.lower())
    if task is None:
        raise InputError(f"unknown task {name!r}; known: {', '.join(TASKS)}")
    return task


__all__ = ["PAPER_SUITE", "TASKS", "Example", "Task", "get_task"]
