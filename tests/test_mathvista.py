"""MathVista: the official extraction / normalisation rules on hand-computed cases, and the loader on
a tiny parquet and TSV built with the documented schema."""

import base64
import io

import pytest
from PIL import Image

from dsvl2.errors import InputError
from dsvl2.evaluation import metrics
from dsvl2.evaluation.mathvista import extract_answer, mathvista_match, normalize_extracted_answer
from dsvl2.evaluation.tasks import PAPER_SUITE, get_task

CHOICES = ["3/11", "8/11", "6/11", "3/5"]


@pytest.mark.parametrize("prediction, expected", [
    ("A", 1.0),  # a letter among the first 4 picks that choice's text
    ("3/11", 1.0),  # the text itself
    ("(A) 3/11", 1.0),  # "(A)" -> A
    ("(b) 8/11", 0.0),  # "(b)" -> B -> "8/11"
    ("The answer is B", 0.0),  # can_infer finds the one letter token B
    ("E", 0.0),  # not among A-D: the most similar text; distance 4 to all but "3/5" (3) -> "3/5"
    ('The answer is "3/11".', 1.0),  # the official quick extraction
    ("3/10", 1.0),  # no letter: Levenshtein 1 to "3/11", 2 to "8/11" and "6/11", 2 to "3/5"
])
def test_multiple_choice(prediction, expected):
    assert mathvista_match(prediction, "3/11", "multi_choice", "text", CHOICES) == expected


def test_nearest_choice_by_edit_distance():
    assert normalize_extracted_answer("E", CHOICES, "multi_choice", "text", None) == "3/5"
    assert normalize_extracted_answer("8/12", CHOICES, "multi_choice", "text", None) == "8/11"


@pytest.mark.parametrize("prediction, expected", [
    ("5", 1.0), ("5.0", 1.0),  # int(float("5.0")) = 5
    ("5.7", 1.0),  # int() truncates, as the official str(int(float(x)))
    ("There are 5 apples.", 1.0),  # offline fallback: the last number
    ("1,005 then 5", 1.0),  # commas dropped, last number 5
    ("five", 0.0), ("", 0.0), ("6", 0.0),
])
def test_integer(prediction, expected):
    assert mathvista_match(prediction, "5", "free_form", "integer") == expected


@pytest.mark.parametrize("prediction, precision, answer, expected", [
    ("1.23", 1, "1.2", 1.0),  # round(1.23, 1) = 1.2
    ("1.25", 1, "1.2", 1.0),  # 1.25 is exact in binary: round half to even -> 1.2
    ("1.26", 1, "1.2", 0.0),  # 1.3
    ("0.5714", 2, "0.57", 1.0),
    ("about 0.571 m", 2, "0.57", 1.0),  # last number, then rounded
    ("1.2", 2, "1.20", 0.0),  # str(round(1.2, 2)) = "1.2" != "1.20": the official comparison is on strings
])
def test_float_with_precision(prediction, precision, answer, expected):
    assert mathvista_match(prediction, answer, "free_form", "float", precision=precision) == expected


def test_list_and_score_dispatch():
    assert mathvista_match("The values are [2, 5].", "[2, 5]", "free_form", "list") == 1.0
    assert mathvista_match("[2,5]", "[2, 5]", "free_form", "list") == 0.0  # compared as strings
    assert extract_answer("x", "free_form", "list", None) == ""
    assert metrics.score("mathvista", "B", ["8/11"], question_type="multi_choice", answer_type="text",
                         choices=CHOICES) == 1.0
    with pytest.raises(InputError, match="question_type"):
        metrics.score("mathvista", "B", ["8/11"])


# ---- loader ---------------------------------------------------------------------------------------------
def png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (40, 30), (10, 200, 10)).save(buf, "PNG")
    return buf.getvalue()


QUERY = ("Hint: Please answer the question and provide the correct option letter, e.g., A, B, C, D, at the end.\n"
         "Question: What fraction is shaded?\nChoices:\n(A) 3/11\n(B) 8/11\n(C) 6/11\n(D) 3/5")


def test_parquet_and_tsv_layouts(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    meta = pa.struct([("task", pa.string()), ("skills", pa.list_(pa.string())), ("source", pa.string())])
    table = pa.table({
        "pid": ["1", "2"], "query": [QUERY, "Hint: ...\nQuestion: How many?"],
        "image": ["images/1.jpg", "images/2.jpg"],
        "decoded_image": pa.array([{"bytes": png(), "path": "1.jpg"}, {"bytes": png(), "path": "2.jpg"}], type=image),
        "choices": pa.array([CHOICES, None], type=pa.list_(pa.string())), "answer": ["3/11", "7"],
        "question_type": ["multi_choice", "free_form"], "answer_type": ["text", "integer"],
        "precision": pa.array([None, None], type=pa.float64()),
        "metadata": pa.array([{"task": "math word problem", "skills": ["arithmetic reasoning"], "source": "X"},
                              {"task": "figure question answering", "skills": ["numeric commonsense"], "source": "Y"}],
                             type=meta),
    })
    (tmp_path / "data").mkdir()
    pq.write_table(table, tmp_path / "data" / "testmini-00000-of-00001-abc.parquet")
    task = get_task("mathvista")
    exs = task.examples(tmp_path)
    assert [e.id for e in exs] == ["1", "2"]
    assert task.prompt(exs[0])[0]["content"] == "<image>\n" + QUERY
    assert exs[0].categories == {"task": ["math word problem"], "skills": ["arithmetic reasoning"]}
    assert exs[0].images[0].load().size == (40, 30)
    assert task.score(exs[0], task.postprocess(exs[0], "A.")) == 1.0
    assert task.score(exs[1], "7") == 1.0 and task.score(exs[1], "8") == 0.0
    tsv = tmp_path / "MathVista_MINI.tsv"
    cells = ["index", "image", "question", "answer", "choices", "question_type", "answer_type", "precision", "skills"]
    row = ["5", base64.b64encode(png()).decode(), "What is x?", "1.5", "", "free_form", "float", "1.0",
           "['algebraic reasoning']"]
    tsv.write_text("\t".join(cells) + "\n" + "\t".join(row) + "\n", encoding="utf-8")
    ex = task.examples(tsv)[0]
    assert ex.extra == {"question_type": "free_form", "answer_type": "float", "choices": None, "precision": 1}
    assert ex.categories == {"skills": ["algebraic reasoning"]}
    assert task.score(ex, "x = 1.54") == 1.0
    assert "mathvista" in PAPER_SUITE


def test_bad_rows_name_the_problem(tmp_path):
    tsv = tmp_path / "MathVista_MINI.tsv"
    cells = ["index", "image", "question", "answer", "choices", "question_type", "answer_type"]
    row = ["5", base64.b64encode(png()).decode(), "Which?", "x", "", "multi_choice", "text"]
    tsv.write_text("\t".join(cells) + "\n" + "\t".join(row) + "\n", encoding="utf-8")
    with pytest.raises(InputError, match="multi_choice question without choices"):
        get_task("mathvista").examples(tsv)
