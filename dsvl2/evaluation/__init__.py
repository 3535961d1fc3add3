"""Benchmark evaluation of DeepSeek-VL2 as DeepSeek evaluates it (eval-datasets.md).

- :mod:`.metrics`: the scoring rules as pure functions, ``score(task, prediction, answers, **extra)``
  and ``iou(box_a, box_b)``;
- :mod:`.data`: parquet / TSV / JSONL loaders with lazy images;
- :mod:`.tasks`: one recipe per benchmark (examples, prompt, score, summary), by name;
- :mod:`.run`: the resumable runner (``dsvl2 eval`` is ``dsvl2/cli/eval.py``);
- :mod:`.report`: markdown tables, the paper table, grounding drawings.

Rule choices are documented in ``docs/evaluation.md``.
"""

from dsvl2.evaluation.metrics import (
    anls,
    exact_match,
    extract_choice,
    grounding_hit,
    integer_match,
    iou,
    multiple_choice,
    normalize_vqa_answer,
    ocrbench_match,
    relaxed_accuracy,
    score,
    vqa_accuracy,
)
from dsvl2.evaluation.run import Model, evaluate, run_suite
from dsvl2.evaluation.tasks import TASKS, get_task

__all__ = [
    "TASKS",
    "Model",
    "anls",
    "evaluate",
    "exact_match",
    "extract_choice",
    "get_task",
    "grounding_hit",
    "integer_match",
    "iou",
    "multiple_choice",
    "normalize_vqa_answer",
    "ocrbench_match",
    "relaxed_accuracy",
    "run_suite",
    "score",
    "vqa_accuracy",
]
