"""MathVista (testmini) scoring: the official answer extraction and normalisation rules.

Reproduces ``extract_answer`` (its rule-based part) and ``normalize_extracted_answer`` /
``safe_equal`` of the official evaluation (lupantech/MathVista ``evaluation/extract_answer.py`` and
``evaluation/calculate_score.py``):

extraction (response -> extraction)
    - an empty response -> ``""``;
    - multiple choice and the response is one of the choice texts -> the response;
    - integer answer and ``int(response)`` works -> that integer; float answer and ``float(response)``
      works -> that float;
    - ``The answer is "text".`` -> ``text`` (the official "quick extraction");
    - otherwise the official code asks GPT-4 to extract the answer. Offline we use rules instead
      (stated here and in docs/evaluation.md): multiple choice -> the letter VLMEvalKit's
      ``can_infer`` finds (:func:`~dsvl2.evaluation.metrics.extract_choice`), else the response;
      integer / float -> the last number of the response; list -> the last ``[...]``; text -> the
      response.
normalisation (extraction -> the string compared with the gold ``answer``)
    - multiple choice: a letter in parentheses ``(B)`` becomes ``B``; a letter among the first
      ``len(choices)`` letters selects that choice's text; anything else becomes the choice text at
      the smallest Levenshtein distance (first on ties);
    - integer: ``str(int(float(x)))``; float: ``str(round(float(x), precision))``; list: ``str(x)``;
      unparsable -> no answer (wrong);
correct iff ``str(normalised).strip() == str(answer).strip()``. MathVista's multiple-choice gold
``answer`` is the choice TEXT, not its letter.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from dsvl2.evaluation.metrics import extract_choice, levenshtein

MULTI_CHOICE = "multi_choice"
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
_LIST = re.compile(r"\[[^\[\]]*\]")


def extract_answer(response: str, question_type: str, answer_type: str, choices: Sequence[str] | None) -> str:
    """The official rule-based extraction, with the offline fallback described in the module docstring."""
    choices = list(choices or [])
    if response == "":
        return ""
    if question_type == MULTI_CHOICE and response in choices:
        return response
    if answer_type == "integer":
        try:
            return str(int(response))
        except ValueError:
            pass
    if answer_type == "float":
        try:
            return str(float(response))
        except ValueError:
            pass
    quick = re.search(r'The answer is "(.*)"\.', response)
    if quick:
        return quick.group(1)
    if question_type == MULTI_CHOICE:
        letter = extract_choice(response, choices) if choices else None
        return letter or response
    if answer_type in ("integer", "float"):
        numbers = _NUMBER.findall(response.replace(",", ""))
        return numbers[-1] if numbers else ""
    if answer_type == "list":
        lists = _LIST.findall(response)
        return lists[-1] if lists else ""
    return response


def normalize_extracted_answer(extraction: str, choices: Sequence[str] | None, question_type: str,
                               answer_type: str, precision: float | int | None) -> str | None:
    """The official ``normalize_extracted_answer``; None = no usable answer."""
    if question_type == MULTI_CHOICE:
        choices = list(choices or [])
        if not choices:
            return None
        extraction = str(extraction).strip()
        letter = re.findall(r"\(([a-zA-Z])\)", extraction)
        if letter:
            extraction = letter[0].upper()
        letters = [chr(ord("A") + i) for i in range(len(choices))]
        if extraction in letters:
            return choices[letters.index(extraction)]
        distances = [levenshtein(extraction, str(c)) for c in choices]
        return choices[distances.index(min(distances))]
    try:
        if answer_type == "integer":
            return str(int(float(extraction)))
        if answer_type == "float":
            return str(round(float(extraction), int(precision or 0)))
    except (TypeError, ValueError, OverflowError):
        return None
    return str(extraction)


def mathvista_match(prediction: str, answer: str, question_type: str, answer_type: str,
                    choices: Sequence[str] | None = None, precision: float | int | None = None) -> float:
    """1.0 iff the extracted, normalised prediction equals the gold ``answer`` (``safe_equal``)."""
    extraction = extract_answer(prediction, question_type, answer_type, choices)
    normalized = normalize_extracted_answer(extraction, choices, question_type, answer_type, precision)
    return float(normalized is not None and str(normalized).strip() == str(answer).strip())
