"""Benchmark metrics as pure functions: one prediction, the gold answers, one score in [0, 1].

Every rule reproduces a named community script (eval-datasets.md section 4); where two references
disagree the choice is stated here and in ``docs/evaluation.md``:

- :func:`anls` (DocVQA, InfoVQA): lmms-eval ``docvqa/utils.py`` = VLMEvalKit ``anls_compute``.
  Distance on stripped, lower-cased, space-collapsed strings; length on the raw strings
  (``len(s.upper())``, as both codes); a question score of exactly 0.5 is kept (``< 0.5`` -> 0).
- :func:`vqa_accuracy` (TextVQA): the official TextVQA/EvalAI evaluator (MMF
  ``TextVQAAccuracyEvaluator`` + ``EvalAIAnswerProcessor``, also lmms-eval): prediction and all
  golds normalised the same way, then the mean over the 10 leave-one-out subsets of
  ``min(1, matches / 3)``. VLMEvalKit's ``process_answer`` lacks the first step
  (lower-case, drop ``,`` and ``?``, split ``'s``); the two differ only on answers with commas or
  possessives.
- :func:`relaxed_accuracy` (ChartQA): pix2struct ``relaxed_correctness`` with (target, prediction)
  in the right order (VLMEvalKit since PR #1204), prediction stripped as VLMEvalKit does.
- :func:`ocrbench_match` (OCRBench): the OCRBench authors' script = VLMEvalKit ``OCRBench.evaluate``
  (substring match; no full-width folding, a 2026 lmms-eval addition).
- :func:`extract_choice` (AI2D, MMStar, MMBench, MMMU): VLMEvalKit ``can_infer`` as of Dec 2024,
  the version DeepSeek evaluated with (no LLM judge; later versions add a "last 5 tokens" rule).
- MathVista: the official ``extract_answer`` (rule part) + ``normalize_extracted_answer`` in
  :mod:`dsvl2.evaluation.mathvista` (an offline rule replaces its GPT-4 extractor).
- :func:`iou` / :func:`grounding_hit` (RefCOCO family, demo grounding): 0-999 boxes parsed by
  :func:`dsvl2.processing.grounding.parse_grounding` (numbers as the official parser reads them,
  non-integer and negative included, then clipped), converted with ``Box.to_pixels``
  (``int(v / 999 * W)``), hit iff IoU with the gold pixel box >= 0.5 on the first box.

:func:`score` dispatches on a task name; it scores the text as given (the DeepSeek wrapper's
``rstrip('.')`` belongs to the runner, not to the metric).
"""

import re
from collections.abc import Mapping, Sequence
from typing import Any

from dsvl2.errors import InputError

# ----------------------------------------------------------------------------- ANLS


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insert, delete, substitute all cost 1)."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def anls(prediction: str, answers: Sequence[str] | str, threshold: float = 0.5) -> float:
    """Average Normalised Levenshtein Similarity of one question: ``1 - min_g NL(g, pred)``,
    set to 0 when below ``threshold`` (a score of exactly 0.5 is kept)."""
    answers = [answers] if isinstance(answers, str) else list(answers)
    if not answers:
        return 0.0
    pred_norm = " ".join(prediction.strip().lower().split())
    distances = []
    for gold in answers:
        gold_norm = " ".join(gold.strip().lower().split())
        length = max(len(gold.upper()), len(prediction.upper()))  # raw strings, as the references
        distances.append(0.0 if length == 0 else levenshtein(gold_norm, pred_norm) / length)
    value = 1.0 - min(distances)
    return 0.0 if value < threshold else value


# ----------------------------------------------------------------------------- VQA accuracy

# Tables of the official VQA evaluation (vqaEval.py), copied verbatim by EvalAIAnswerProcessor,
# including their quirks ("somebody'd" -> "somebodyd", capitalised keys that never match).
CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've",
    "hasnt": "hasn't", "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've",
    "hes": "he's", "howd": "how'd", "howll": "how'll", "hows": "how's", "Id've": "I'd've",
    "I'dve": "I'd've", "Im": "I'm", "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've",
    "it'dve": "it'd've", "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've",
    "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've",
    "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't", "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd", "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've", "somebodyll": "somebody'll", "somebodys": "somebody's",
    "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've",
    "werent": "weren't", "whatll": "what'll", "whatre": "what're", "whats": "what's",
    "whatve": "what've", "whens": "when's", "whered": "where'd", "wheres": "where's",
    "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've",
    "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're",
    "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've",
    "y'all'dve": "y'all'd've", "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've",
    "youll": "you'll", "youre": "you're", "youve": "you've",
}  # fmt: skip
NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = ("a", "an", "the")
PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`",
               ",", "?", "!")
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")
# The official regex: "(?!<=\d)" is a typo of a look-behind and never fires, so a period is removed
# unless a digit FOLLOWS it ("3.5" and ".5" keep theirs, "5." and "a.b" lose it).
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")


def normalize_vqa_answer(text: str) -> str:
    """EvalAIAnswerProcessor: lower-case, drop ``,``/``?``, split ``'s``; punctuation; number
    words, articles and contractions. Applied to predictions and golds alike."""
    text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = text.replace("\n", " ").replace("\t", " ").strip()
    out = text
    for p in PUNCTUATION:  # the test looks at the text before any replacement, as the reference
        if p + " " in text or " " + p in text or _COMMA_STRIP.search(text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    out = _PERIOD_STRIP.sub("", out, count=32)  # re.UNICODE (= 32) passed as `count` by the reference
    words = [NUMBER_WORDS.get(w, w) for w in out.lower().split()]
    words = [CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES]
    return " ".join(words)


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """Mean over the leave-one-out subsets of ``min(1, #others equal to the prediction / 3)``.

    With 10 golds of which k equal the prediction: ``(k * min(1, (k-1)/3) + (10-k) * min(1, k/3)) / 10``.
    """
    if isinstance(answers, str):
        answers = [answers]
    golds = [normalize_vqa_answer(a) for a in answers]
    if not golds:
        return 0.0
    pred = normalize_vqa_answer(prediction)
    matches = sum(g == pred for g in golds)
    # leaving out gold i removes one match iff gold i itself matches
    accs = [min(1.0, (matches - (g == pred)) / 3) for g in golds]
    return sum(accs) / len(accs)


# ----------------------------------------------------------------------------- ChartQA


def _to_float(text: str) -> float | None:
    """pix2struct ``_to_float``: a trailing ``%`` divides by 100; ``float()`` otherwise."""
    try:
        if text.endswith("%"):
            return float(text.rstrip("%")) / 100.0
        return float(text)
    except ValueError:
        return None


def relaxed_correctness(prediction: str, target: str, max_relative_change: float = 0.05) -> bool:
    """Numbers within 5 % of a non-zero target; otherwise case-insensitive string equality."""
    prediction, target = str(prediction), str(target)
    pred_f, target_f = _to_float(prediction), _to_float(target)
    if pred_f is not None and target_f:
        return abs(pred_f - target_f) / abs(target_f) <= max_relative_change
    return prediction.lower() == target.lower()


def relaxed_accuracy(prediction: str, answers: Sequence[str] | str) -> float:
    """1.0 if the stripped prediction is relaxed-correct for any gold answer, else 0.0."""
    answers = [answers] if isinstance(answers, str) else list(answers)
    return float(any(relaxed_correctness(prediction.strip(), a) for a in answers))


# ----------------------------------------------------------------------------- OCRBench

HMER = "Handwritten Mathematical Expression Recognition"


def ocrbench_match(prediction: str, answers: Sequence[str] | str, question_type: str | None = None,
                   dataset: str | None = None) -> float:
    """1.0 if a processed answer is a substring of the processed prediction.

    Handwritten maths (``question_type`` HMER or source ``dataset`` HME100k): spaces and newlines
    removed, case kept. Otherwise lower-cased and stripped, then newlines -> spaces (in that order,
    as the reference).
    """
    answers = [answers] if isinstance(answers, str) else list(answers)
    if question_type == HMER or dataset == "HME100k":
        pred = prediction.strip().replace("\n", " ").replace(" ", "")
        golds = [a.strip().replace("\n", " ").replace(" ", "") for a in answers]
    else:
        pred = prediction.lower().strip().replace("\n", " ")
        golds = [a.lower().strip().replace("\n", " ") for a in answers]
    return float(any(g in pred for g in golds))


# ----------------------------------------------------------------------------- multiple choice

_REFUSALS = ("Sorry, I can't help with images of people yet.", "I can't process this file.",
             "I'm sorry, but without the image provided", "Cannot determine the answer")


def _as_choices(choices: Mapping[str, str | None] | Sequence[str]) -> dict[str, str | None]:
    if isinstance(choices, Mapping):
        return dict(choices)
    return {chr(ord("A") + i): text for i, text in enumerate(choices)}


def extract_choice(prediction: str, choices: Mapping[str, str | None] | Sequence[str]) -> str | None:
    """The option letter a free-text answer names, or None (VLMEvalKit ``can_infer``, Dec 2024).

    1. Option pass: each of ``.()[],:;!*#{}`` becomes a space; split on whitespace; if exactly one
       choice letter occurs as a token, that letter.
    2. Text pass: if exactly one (lower-cased) option text is a substring of the lower-cased
       prediction, its letter.
    A refusal phrase or a lone ``Z`` token gives VLMEvalKit's "Z" (no answer): None here, like any
    failure, which the scorer counts as wrong. Options whose text is None/empty take part in the
    option pass only. ``choices`` may also be a list of option texts (letters A, B, ...).
    """
    choices = _as_choices(choices)
    prediction = str(prediction)
    if "Failed to obtain answer via API" not in prediction:  # the reference skips the option pass
        if any(r in prediction for r in _REFUSALS):
            return None
        modified = prediction
        for c in ".()[],:;!*#{}":
            modified = modified.replace(c, " ")
        tokens = modified.split()
        found = [letter for letter in choices if letter in tokens]
        if len(found) == 1:
            return found[0]
        if not found and "Z" in tokens:
            return None
    lowered = prediction.lower()
    hits = [k for k, text in choices.items() if text and str(text).lower() in lowered]
    return hits[0] if len(hits) == 1 else None


def multiple_choice(prediction: str, answer: str, choices: Mapping[str, str | None] | Sequence[str]) -> float:
    """1.0 iff :func:`extract_choice` finds the gold letter; an unmatched answer is wrong."""
    return float(extract_choice(prediction, choices) == answer)


# ----------------------------------------------------------------------------- grounding


def iou(box_a: Sequence[float], box_b: Sequence[float]) -> float:
    """Intersection over union of two ``[x1, y1, x2, y2]`` boxes in continuous coordinates (no +1).

    A box with ``x2 < x1`` or ``y2 < y1`` has zero area (it is not swapped); IoU is 0 when the
    union is empty.
    """
    ax1, ay1, ax2, ay2 = (float(v) for v in box_a)
    bx1, by1, bx2, by2 = (float(v) for v in box_b)
    inter = max(0.0, min(ax2, bx2) - max(ax1, bx1)) * max(0.0, min(ay2, by2) - max(ay1, by1))
    area_a = max(0.0, ax2 - ax1) * max(0.0, ay2 - ay1)
    area_b = max(0.0, bx2 - bx1) * max(0.0, by2 - by1)
    union = area_a + area_b - inter
    return inter / union if union > 0 else 0.0


def first_box(prediction: str, width: int, height: int) -> tuple[int, int, int, int] | None:
    """Pixel corners of the first box of a grounded answer, or None for a miss.

    Parsed with the core's :func:`~dsvl2.processing.grounding.parse_grounding` (decode with special
    tokens kept). Without any ``<|det|>`` tag (special tokens skipped) the whole text is read as a
    det body, i.e. the first ``[x1, y1, x2, y2]`` list. Numbers are read as the official parser
    reads them (it evaluates the list as Python): non-integers and negatives count, and values are
    then clipped to the image (0-999), so ``[[-3, 10, 400, 500]]`` is the box from x = 0 and
    ``[[162.5, 328, 540.2, 966]]`` is kept as written. A first list with a wrong count of numbers,
    a value that is not a number, or corners out of order (x2 < x1, which the parser would sort)
    is a miss, as eval-datasets.md 3.10 asks for malformed outputs.
    """
    from dsvl2.processing.grounding import DET, DET_END, parse_grounding

    text = prediction if DET in prediction else f"{DET}{prediction}{DET_END}"
    parsed = parse_grounding(text)
    first = [e for e in parsed.errors if re.match(r"det 0\b.*\bbox 0:", e) and not e.endswith("clamped")]
    if first or not parsed.boxes:
        return None
    return parsed.boxes[0].to_pixels(width, height)


def grounding_hit(prediction: str, box: Sequence[float], width: int, height: int,
                  threshold: float = 0.5) -> float:
    """1.0 iff the first predicted box has IoU >= ``threshold`` with the gold pixel ``box``."""
    pred = first_box(prediction, width, height)
    return float(pred is not None and iou(pred, box) >= threshold)


# ----------------------------------------------------------------------------- demo rules


def exact_match(prediction: str, answers: Sequence[str] | str) -> float:
    """Case-insensitive equality after stripping, against any gold answer."""
    answers = [answers] if isinstance(answers, str) else list(answers)
    return float(any(prediction.strip().lower() == a.strip().lower() for a in answers))


def integer_match(prediction: str, answers: Sequence[str] | str) -> float:
    """The stripped prediction is an integer equal to a gold integer (``"07"`` = 7, ``"7.0"`` is not)."""
    answers = [answers] if isinstance(answers, str) else list(answers)
    text = prediction.strip()
    if not re.fullmatch(r"[+-]?\d+", text):
        return 0.0
    return float(any(re.fullmatch(r"\s*[+-]?\d+\s*", str(a)) and int(text) == int(a) for a in answers))


# ----------------------------------------------------------------------------- dispatch

MCQ_TASKS = ("ai2d", "mmstar", "mmbench", "mmmu")
GROUNDING_TASKS = ("refcoco", "refcoco+", "refcocog", "demo_grounding")


def _gold_box(answers: Any) -> list[float]:
    box = answers
    if isinstance(box, Sequence) and len(box) == 1 and isinstance(box[0], Sequence):
        box = box[0]
    if isinstance(box, str) or not isinstance(box, Sequence) or len(box) != 4:
        raise InputError(f"a grounding gold answer is one pixel box [x1, y1, x2, y2], got {answers!r}")
    return [float(v) for v in box]


def score(task: str, prediction: str, answers: Any, **extra: Any) -> float:
    """Score one prediction with the rule of ``task``; returns a value in [0, 1].

    ==============================  =========================================================
    task                            answers / extra
    ==============================  =========================================================
    docvqa, infovqa                 list of accepted strings -> :func:`anls`
    chartqa                         target string(s) -> :func:`relaxed_accuracy`
    textvqa                         the (10) human answers -> :func:`vqa_accuracy`
    ocrbench                        accepted strings; ``question_type`` (or ``category``),
                                    ``dataset`` -> :func:`ocrbench_match` (0/1, x1000 later)
    ai2d, mmstar, mmbench, mmmu     gold letter (or ``[letter]``); ``choices`` (or ``options``) =
                                    {letter: text} or a list of option texts -> :func:`multiple_choice`.
                                    mmmu with ``question_type="open"`` (or no choices): gold
                                    text, scored as VLMEvalKit's 2-option MCQ
                                    {A: gold, B: "Other Answers"}, gold letter A
    refcoco, refcoco+, refcocog,    gold pixel box ``[x1, y1, x2, y2]`` (or ``[box]``);
    demo_grounding                  ``width``, ``height`` of the image -> :func:`grounding_hit`
    mathvista                       gold answer string (a choice TEXT for multiple choice);
                                    ``question_type``, ``answer_type``, ``choices`` (list),
                                    ``precision`` -> :func:`dsvl2.evaluation.mathvista.mathvista_match`
    demo_reading                    answer string -> :func:`exact_match`
    demo_charts                     answer integer -> :func:`integer_match`
    ==============================  =========================================================

    MMBench's CircularEval combines these per-row scores per question group; see
    :mod:`dsvl2.evaluation.tasks.mcq`.
    """
    name = task.lower()
    if name in ("docvqa", "infovqa"):
        return anls(prediction, answers)
    if name == "chartqa":
        return relaxed_accuracy(prediction, answers)
    if name == "textvqa":
        return vqa_accuracy(prediction, answers)
    if name == "ocrbench":
        qtype = extra.get("question_type", extra.get("category"))
        return ocrbench_match(prediction, answers, question_type=qtype, dataset=extra.get("dataset"))
    if name in MCQ_TASKS:
        gold = answers[0] if not isinstance(answers, str) else answers
        choices = extra.get("choices", extra.get("options"))
        if name == "mmmu" and (extra.get("question_type") == "open" or not choices):
            return multiple_choice(prediction, "A", {"A": gold, "B": "Other Answers"})
        if not choices:
            raise InputError(f"{task}: score() needs choices={{letter: option text}}")
        return multiple_choice(prediction, gold, choices)
    if name in GROUNDING_TASKS:
        if "width" not in extra or "height" not in extra:
            raise InputError(f"{task}: score() needs the image width= and height=")
        return grounding_hit(prediction, _gold_box(answers), int(extra["width"]), int(extra["height"]))
    if name == "mathvista":
        from dsvl2.evaluation.mathvista import mathvista_match  # it builds on this module

        gold = answers[0] if isinstance(answers, (list, tuple)) else answers
        if "question_type" not in extra or "answer_type" not in extra:
            raise InputError(f"{task}: score() needs question_type= and answer_type=")
        return mathvista_match(prediction, str(gold), extra["question_type"], extra["answer_type"],
                               extra.get("choices"), extra.get("precision"))
    if name == "demo_reading":
        return exact_match(prediction, answers)
    if name == "demo_charts":
        return integer_match(prediction, answers)
    raise InputError(f"unknown task {task!r} for score(); known: docvqa, infovqa, chartqa, textvqa, "
                     f"ocrbench, {', '.join(MCQ_TASKS)}, {', '.join(GROUNDING_TASKS)}, mathvista, demo_reading, "
                     "demo_charts")
