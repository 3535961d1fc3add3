"""Hand-computed cases for every scoring rule of dsvl2.evaluation.metrics, traps included.

Each expected value is worked out in the comment beside it from the rule in eval-datasets.md 4.
"""

import pytest

from dsvl2.errors import InputError
from dsvl2.evaluation.metrics import (
    HMER,
    anls,
    exact_match,
    extract_choice,
    first_box,
    grounding_hit,
    integer_match,
    iou,
    levenshtein,
    normalize_vqa_answer,
    ocrbench_match,
    relaxed_accuracy,
    score,
    vqa_accuracy,
)

# ------------------------------------------------------------------------------------ ANLS


@pytest.mark.parametrize("pred, golds, expected", [
    ("hello", ["hello"], 1.0),
    ("  Hello   World ", ["hello world"], 1.0),  # normalised strings equal -> d = 0
    ("hello", ["hallo"], 0.8),  # d = 1, L = 5 -> 1 - 1/5
    ("abxy", ["abcd"], 0.5),  # d = 2, L = 4 -> NL = 0.5 -> 1 - 0.5 = 0.5 is KEPT (only < 0.5 -> 0)
    ("xyc", ["abc"], 0.0),  # d = 2, L = 3 -> 1/3 < 0.5 -> 0
    ("abxyz", ["abcde"], 0.0),  # d = 3, L = 5 -> 1 - 0.6 = 0.4 < 0.5 -> 0 (a 0.4 threshold would keep it)
    ("abcdefghiXXXXXXXXXXX", ["abcdefghijklmnopqrst"], 0.0),  # d = 11, L = 20 -> 0.45 < 0.5 -> 0
    ("abcdefghiXXXXXXXXXXX", ["abcdefghijklmnopqrst", "abcdefghijXXXXXXXXXX"], 0.95),  # min d = 1 -> 0.95
    ("abd", ["abc", "abd"], 1.0),  # min over golds
    ("  ab  ", ["abcd"], 1 - 2 / 6),  # d("ab", "abcd") = 2 but L uses the RAW prediction (6) -> 0.667, not 0.5
    ("xa", ["ßa"], 1 - 1 / 3),  # d = 1; L = len("SSA") = 3 (upper-cased, as both references) -> 0.667
    ("", [""], 1.0),  # L = 0 -> NL = 0
    ("", ["abc"], 0.0),  # d = 3, L = 3
    ("abc", [], 0.0),  # no gold
])
def test_anls(pred, golds, expected):
    assert anls(pred, golds) == pytest.approx(expected)


def test_levenshtein():
    assert levenshtein("kitten", "sitting") == 3  # k->s, e->i, +g
    assert levenshtein("", "abc") == 3 and levenshtein("abc", "abc") == 0


# ------------------------------------------------------------------------------------ VQA accuracy


@pytest.mark.parametrize("k, expected", [
    # 10 golds, k equal to the prediction. Leaving out a matching gold leaves k-1 matches, leaving out
    # another leaves k: acc = (k * min(1, (k-1)/3) + (10-k) * min(1, k/3)) / 10
    (0, 0.0),
    (1, 0.3),  # (1 * 0 + 9 * 1/3) / 10 = 3/10
    (2, 0.6),  # (2 * 1/3 + 8 * 2/3) / 10 = (2/3 + 16/3) / 10 = 6/10
    (3, 0.9),  # (3 * 2/3 + 7 * 1) / 10 = (2 + 7) / 10
    (4, 1.0),  # (4 * 1 + 6 * 1) / 10
    (10, 1.0),
])
def test_vqa_accuracy_leave_one_out(k, expected):
    golds = ["cat"] * k + [f"other{i}" for i in range(10 - k)]
    assert vqa_accuracy("cat", golds) == pytest.approx(expected)


@pytest.mark.parametrize("text, normalised", [
    ("Two", "2"),  # number words -> digits, lower-cased
    ("none", "0"),
    ("The Cat", "cat"),  # articles dropped
    ("a dog and an apple", "dog and apple"),
    ("cat.", "cat"),  # a period not followed by a digit is removed
    ("3.5", "3.5"),  # ... followed by a digit it stays
    ("5.", "5"),
    ("dont", "don't"),  # contraction table
    ("1,000", "1000"),  # EvalAI drops every comma first
    ("hello - world", "hello world"),  # "-" touches a space -> deleted
    ("well-known", "well known"),  # "-" touches no space -> replaced by a space
    ("yes!", "yes"),  # "!" touches no space -> space, then stripped by split()
    ("man's hat", "man 's hat"),  # EvalAI splits possessive 's
    ("what?", "what"),
    ("line\none", "line 1"),  # newline -> space, "one" -> "1"
])
def test_normalize_vqa_answer(text, normalised):
    assert normalize_vqa_answer(text) == normalised


def test_vqa_accuracy_normalises_both_sides():
    assert vqa_accuracy("Two", ["2", "2", "2"] + ["x"] * 7) == pytest.approx(0.9)  # 3 matches
    assert vqa_accuracy("the Well-Known", ["well known"] * 10) == 1.0
    assert vqa_accuracy("dont", ["don't"] * 4) == 1.0  # fewer than 10 golds still works
    assert vqa_accuracy("anything", []) == 0.0


# ------------------------------------------------------------------------------------ ChartQA


@pytest.mark.parametrize("pred, target, expected", [
    ("12", "12.5", 1.0),  # |12 - 12.5| / 12.5 = 0.04 <= 0.05
    ("11.8", "12.5", 0.0),  # 0.7 / 12.5 = 0.056
    ("105", "100", 1.0),  # exactly 5 % is still correct (<=)
    ("95", "100", 1.0),
    ("95.1", "100", 1.0),  # 4.9 / 100 (target) = 0.049; relative to the prediction (old VLMEvalKit) 0.0515 -> wrong
    ("100", "95.1", 0.0),  # 4.9 / 95.1 = 0.0515 relative to the target
    ("0", "0", 1.0),  # target 0: no tolerance, string comparison "0" == "0"
    ("0.0", "0", 0.0),  # ... and "0.0" != "0"
    ("0.12", "12%", 1.0),  # trailing % divides by 100: 0.12 vs 0.12
    ("12", "12%", 0.0),  # 12 vs 0.12
    ("12.3%", "12%", 1.0),  # 0.123 vs 0.12: 2.5 %
    ("Yes", "yes", 1.0),  # text: case-insensitive equality
    (" Yes\n", "yes", 1.0),  # the prediction is stripped (VLMEvalKit)
    ("twelve", "12", 0.0),
    ("1,000", "1000", 0.0),  # float("1,000") fails -> strings differ (the reference's behaviour)
    ("-10.4", "-10", 1.0),  # 0.4 / 10 = 0.04
    ("12.", "12", 1.0),  # float("12.") parses
])
def test_relaxed_accuracy(pred, target, expected):
    assert relaxed_accuracy(pred, target) == expected


def test_relaxed_accuracy_any_answer():
    assert relaxed_accuracy("7", ["3", "7.2"]) == 1.0  # 0.2 / 7.2 = 0.028
    assert relaxed_accuracy("7", []) == 0.0


# ------------------------------------------------------------------------------------ OCRBench


@pytest.mark.parametrize("pred, golds, qtype, dataset, expected", [
    ("The answer is HELLO world", ["hello"], "Regular Text Recognition", None, 1.0),  # substring, any case
    ("hel lo", ["hello"], "Regular Text Recognition", None, 0.0),
    ("AB\ncd", ["ab cd"], "Doc-oriented VQA", None, 1.0),  # newline -> space
    ("x", ["y", "X"], "Scene Text-centric VQA", None, 1.0),  # any accepted answer
    ("\\frac { a } { b }", ["\\frac{a}{b}"], HMER, None, 1.0),  # maths: spaces removed
    ("x^2", ["X^2"], HMER, None, 0.0),  # maths: case kept
    ("x^2", ["X^2"], "Key Information Extraction", None, 1.0),  # other types: case-insensitive
    ("x ^ 2", ["x^2"], None, "HME100k", 1.0),  # the source dataset selects the maths rule too
    ("anything", [""], "Regular Text Recognition", None, 1.0),  # "" is a substring of everything
])
def test_ocrbench_match(pred, golds, qtype, dataset, expected):
    assert ocrbench_match(pred, golds, question_type=qtype, dataset=dataset) == expected


def test_ocrbench_score_dispatch_reads_category():
    assert score("ocrbench", "X^2", ["x^2"], category=HMER) == 0.0
    assert score("ocrbench", "X^2", ["x^2"], question_type="Doc-oriented VQA") == 1.0


# ------------------------------------------------------------------------------------ multiple choice

CHOICES = {"A": "cat", "B": "dog", "C": "bird"}


@pytest.mark.parametrize("pred, expected", [
    ("B", "B"),
    ("(C) bird", "C"),  # "(" and ")" become spaces -> token "C"
    ("The answer is B.", "B"),
    ("**B**", "B"),
    ("B: dog", "B"),
    ("A or B", None),  # two letters -> option pass fails; "a or b" contains no option text -> None
    ("It is a dog", "B"),  # no capital letter token; only "dog" occurs -> B
    ("A dog", "A"),  # VLMEvalKit trap: the quantifier "A" is a letter token and wins over the text
    ("cat and dog", None),  # two option texts
    ("Cannot determine the answer", None),  # refusal -> VLMEvalKit's "Z"
    ("Z", None),
    ("D", None),  # not a choice; no text either
    ("b", None),  # letters are case-sensitive
    ("", None),
    ("I think it's a BIRD", "C"),  # text pass is case-insensitive
])
def test_extract_choice(pred, expected):
    assert extract_choice(pred, dict(CHOICES)) == expected


def test_extract_choice_option_without_text_and_list_choices():
    assert extract_choice("C", dict.fromkeys("ABCD")) == "C"
    assert extract_choice("the cat", dict.fromkeys("ABCD")) is None
    assert extract_choice("B", ["cat", "dog"]) == "B"  # a list means letters A, B, ...
    assert extract_choice("C", ["cat", "dog"]) is None


def test_extract_choice_api_failure_skips_only_the_option_pass():
    # VLMEvalKit: can_infer_option gives up on this marker, can_infer_text still runs
    assert extract_choice("Failed to obtain answer via API. A dog", dict(CHOICES)) == "B"


def test_mcq_score():
    assert score("ai2d", "B", "B", choices=CHOICES) == 1.0
    assert score("mmbench", "dog", ["B"], choices=CHOICES) == 1.0
    assert score("mmstar", "A", "B", choices=["cat", "dog"]) == 0.0  # list -> letters A, B
    assert score("ai2d", "the dog", "B", options=CHOICES) == 1.0  # "options" is accepted too
    assert score("mmstar", "I cannot tell", "B", choices=CHOICES) == 0.0  # no letter: wrong, no judge
    with pytest.raises(InputError, match="choices"):
        score("ai2d", "B", "B")


def test_mmmu_open_question_is_two_option_mcq():
    # VLMEvalKit MMMU_preproc: {A: gold, B: "Other Answers"}, gold letter A
    assert score("mmmu", "The result is 42", "42", question_type="open") == 1.0  # text pass -> A
    assert score("mmmu", "B", "42", question_type="open") == 0.0
    assert score("mmmu", "142", "4", question_type="open") == 1.0  # substring quirk: "4" in "142"
    assert score("mmmu", "C", "C", choices={"A": "x", "B": "y", "C": "z"}) == 1.0


# ------------------------------------------------------------------------------------ IoU, grounding


@pytest.mark.parametrize("a, b, expected", [
    ([0, 0, 10, 10], [0, 0, 10, 10], 1.0),
    ([0, 0, 10, 10], [20, 20, 30, 30], 0.0),
    ([0, 0, 10, 10], [5, 0, 15, 10], 1 / 3),  # inter 50, union 100 + 100 - 50 = 150
    ([0, 0, 10, 10], [0, 0, 5, 10], 0.5),  # inter 50, union 100
    ([0, 0, 10, 10], [10, 0, 20, 10], 0.0),  # touching edges: no +1 convention
    ([10, 0, 0, 10], [0, 0, 10, 10], 0.0),  # x2 < x1: zero area, not swapped
    ([5, 5, 5, 5], [5, 5, 5, 5], 0.0),  # empty union
    ([0.5, 0.5, 2.5, 2.5], [1.5, 1.5, 3.5, 3.5], 1 / 7),  # inter 1, union 4 + 4 - 1
])
def test_iou(a, b, expected):
    assert iou(a, b) == pytest.approx(expected)
    assert iou(b, a) == pytest.approx(expected)


def det(*boxes):
    return "<|ref|>the cat<|/ref|><|det|>[" + ", ".join(str(list(b)) for b in boxes) + "]<|/det|>"


def test_first_box_converts_0_999_to_pixels():
    # int(v / 999 * W): 999 -> W exactly; 500 / 999 * 640 = 320.32 -> 320; 250 / 999 * 480 = 120.12 -> 120
    assert first_box(det([0, 250, 500, 999]), 640, 480) == (0, 120, 320, 480)


@pytest.mark.parametrize("text, expected", [
    (det([0, 0, 499, 999]), 1.0),  # pixels (0,0,499,999) vs gold (0,0,998,999): IoU = 499/998 = 0.5 exactly -> hit
    (det([0, 0, 498, 999]), 0.0),  # 498/998 < 0.5
    (det([500, 500, 999, 999], [0, 0, 998, 999]), 0.0),  # only the FIRST box counts
    (det([0, 0, 998, 999], [500, 500, 999, 999]), 1.0),
    ("<|det|>[[0, 0, 998, 999]]<|/det|>", 1.0),  # det without ref
    ("[[0, 0, 998, 999]]", 1.0),  # special tokens skipped: first [x1, y1, x2, y2] list
    ("The cat is at [0, 0, 998, 999].", 1.0),
    (det([0, 0, 998]), 0.0),  # three numbers: malformed -> miss
    (det([0, 0, 998, 999, 5]), 0.0),  # five numbers
    (det([0, 0, 998, 1000]), 1.0),  # value above 999: clipped to the image (1000 -> 999), then scored
    (det([998, 0, 0, 999]), 0.0),  # corners swapped (the parser would sort them): miss
    (det([0.5, 0, 998, 999]), 1.0),  # not an integer: read as the official parser does; int(0.5) = 0
    (det([-4, 0, 998, 999]), 1.0),  # negative: clipped to 0
    ("<|det|>[[x, 0, 998, 999]]<|/det|>", 0.0),  # not a number
    ("I don't see a cat.", 0.0),
    ("", 0.0),
])
def test_grounding_hit(text, expected):
    assert grounding_hit(text, [0, 0, 998, 999], 999, 999) == expected
    assert score("refcoco", text, [[0, 0, 998, 999]], width=999, height=999) == expected


def test_grounding_issue_examples_hit_like_the_official_evaluation():
    # [[162.5, 328, 540.2, 966]] on a 999x999 image: pixels (162, 328, 540, 966); gold (160, 330, 540, 960):
    # inter 378 x 630 = 238140, areas 378 x 638 = 241164 and 380 x 630 = 239400 -> IoU 238140 / 242424 = 0.982
    text = "<|ref|>x<|/ref|><|det|>[[162.5, 328, 540.2, 966]]<|/det|>"
    assert first_box(text, 999, 999) == (162, 328, 540, 966)
    assert score("refcoco", text, [160, 330, 540, 960], width=999, height=999) == 1.0
    # [[-3, 10, 400, 500]]: x1 clipped to 0 -> (0, 10, 400, 500) vs gold (0, 0, 400, 500): 196000 / 200000 = 0.98
    assert first_box("[[-3, 10, 400, 500]]", 999, 999) == (0, 10, 400, 500)
    assert score("refcoco", "[[-3, 10, 400, 500]]", [0, 0, 400, 500], width=999, height=999) == 1.0


def test_grounding_later_box_problems_do_not_spoil_the_first():
    assert grounding_hit(det([0, 0, 998, 999], [1, 2, 3]), [0, 0, 998, 999], 999, 999) == 1.0


def test_grounding_score_needs_image_size():
    with pytest.raises(InputError, match="width"):
        score("refcocog", det([0, 0, 1, 1]), [0, 0, 1, 1])
    with pytest.raises(InputError, match="pixel box"):
        score("refcoco+", det([0, 0, 1, 1]), "0 0 1 1", width=10, height=10)


def test_demo_grounding_inclusive_pixel_box():
    # demo answers encode pixel p as round((p + 0.5) * 999 / W): p = 10 on W = 200 -> 52, back int(52/999*200) = 10
    assert score("demo_grounding", det([52, 52, 527, 527]), [10, 10, 105, 105], width=200, height=200) == 1.0


# ------------------------------------------------------------------------------------ demo rules and dispatch


@pytest.mark.parametrize("pred, gold, expected", [("  Apple ", "apple", 1.0), ("apples", "apple", 0.0)])
def test_exact_match(pred, gold, expected):
    assert exact_match(pred, gold) == expected
    assert score("demo_reading", pred, gold) == expected


@pytest.mark.parametrize("pred, gold, expected", [
    ("7", "7", 1.0), (" 07 ", "7", 1.0), ("7.0", "7", 0.0), ("seven", "7", 0.0), ("8", "7", 0.0), ("", "7", 0.0),
])
def test_integer_match(pred, gold, expected):
    assert integer_match(pred, gold) == expected
    assert score("demo_charts", pred, gold) == expected


def test_score_dispatch():
    assert score("DocVQA", "hello", ["hallo"]) == pytest.approx(0.8)  # names are case-insensitive
    assert score("infovqa", "abxy", ["abcd"]) == 0.5
    assert score("chartqa", "95.1", ["100"]) == 1.0
    assert score("textvqa", "two", ["2"] * 2 + ["x"] * 8) == pytest.approx(0.6)
    with pytest.raises(InputError, match="unknown task"):
        score("vqav2", "a", ["a"])
