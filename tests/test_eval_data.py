"""Loaders and prompts on tiny parquet / TSV / JSONL files built here with the documented schemas
(eval-datasets.md sections 1 and 3); expected prompts written out from section 2.1."""

import base64
import io
import json
from pathlib import Path

import pytest
from PIL import Image

from dsvl2.errors import InputError
from dsvl2.evaluation import metrics
from dsvl2.evaluation.data import read_tsv
from dsvl2.evaluation.tasks import get_task
from dsvl2.evaluation.tasks.mcq import split_embedded_options

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")


# ------------------------------------------------------------------------------------ builders


def png(size=(32, 24), color=(200, 30, 30), mode="RGB", fmt="PNG") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, color if mode == "RGB" else color + (128,) if mode == "RGBA" else 0).save(buf, fmt)
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


def write_parquet(path: Path, columns: dict, types: dict | None = None) -> Path:
    """Columns of python values; ``image*`` columns take bytes (or None) and become HF Image structs."""
    arrays, names = [], []
    for name, values in columns.items():
        if name.startswith("image") and name not in ("image_url", "image_id", "image_width", "image_height"):
            arrays.append(pa.array([None if v is None else {"bytes": v, "path": ""} for v in values], type=IMAGE))
        else:
            arrays.append(pa.array(values, type=(types or {}).get(name)))
        names.append(name)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_arrays(arrays, names=names), path)
    return path


def write_tsv(path: Path, header: list[str], rows: list[list]) -> Path:
    lines = ["\t".join(header)] + ["\t".join(str(v) for v in row) for row in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def text_of(task, ex) -> str:
    return task.prompt(ex)[0]["content"]


# ------------------------------------------------------------------------------------ VQA family


def test_docvqa_parquet_picks_its_config_and_shards(tmp_path):
    for k in range(2):
        write_parquet(tmp_path / "DocVQA" / f"validation-0000{k}-of-00002.parquet", {
            "questionId": [f"q{k}a", f"q{k}b"], "question": ["What?", "Who?"],
            "question_types": [["form"], ["table/list", "form"]], "image": [png(), png((40, 30))],
            "docId": [1, 2], "answers": [["Yes", "yes"], ["Bob"]], "data_split": ["val", "val"]})
    write_parquet(tmp_path / "InfographicVQA" / "validation-00000-of-00001.parquet", {
        "questionId": ["i1"], "question": ["How many?"], "answers": [["3"]], "answer_type": [["number"]],
        "image": [png()], "image_url": [""], "data_split": ["val"]})
    docvqa, infovqa = get_task("docvqa"), get_task("infovqa")
    exs = docvqa.examples(tmp_path)  # default split: validation
    assert [e.id for e in exs] == ["q0a", "q0b", "q1a", "q1b"]  # shards in name order
    assert exs[1].answers == ["Bob"] and exs[1].categories == {"question_types": ["table/list", "form"]}
    assert exs[1].images[0].size == (40, 30) and exs[1].images[0].load().mode == "RGB"
    assert text_of(docvqa, exs[0]) == "<image>\nWhat?\nAnswer the question using a single word or phrase."
    assert [e.id for e in infovqa.examples(tmp_path)] == ["i1"]
    assert [e.id for e in docvqa.examples(tmp_path / "DocVQA", limit=3)] == ["q0a", "q0b", "q1a"]


def test_docvqa_tsv_list_answers_image_reuse_and_dropped_rows(tmp_path):
    path = write_tsv(tmp_path / "DocVQA_VAL.tsv", ["index", "image", "question", "answer"], [
        [10, b64(png((50, 20))), "q1", "['a', 'b']"],
        [11, "10", "q2", "['c']"],  # image cell of <= 64 chars: the image of index 10
        [12, "", "q3", "['d']"],  # no image: dropped, as VLMEvalKit
        [13, b64(png((8, 8), mode="RGBA")), "q4", "plain"],
    ])
    exs = get_task("docvqa").examples(path)
    assert [e.id for e in exs] == ["10", "11", "13"]
    assert exs[0].answers == ["a", "b"] and exs[2].answers == ["plain"]
    assert exs[1].images[0].size == (50, 20)
    assert exs[2].images[0].load().mode == "RGB"  # RGBA -> RGB


def test_chartqa_splits_from_parquet_type_and_tsv_split(tmp_path):
    write_parquet(tmp_path / "data" / "test-00000-of-00001.parquet", {
        "type": ["human_test", "augmented_test"], "question": ["a?", "b?"], "answer": ["12", "Yes"],
        "image": [png(), png()]})
    exs = get_task("chartqa").examples(tmp_path)
    assert [e.id for e in exs] == ["0", "1"]  # no id column: row numbers
    assert [e.categories for e in exs] == [{"split": ["human"]}, {"split": ["augmented"]}]
    assert exs[0].answers == ["12"]
    tsv = write_tsv(tmp_path / "ChartQA_TEST.tsv", ["index", "image", "question", "answer", "split"],
                    [[0, b64(png()), "a?", "12", "test_human"]])
    assert get_task("chartqa").examples(tsv)[0].categories == {"split": ["human"]}


def test_textvqa_keeps_question_case(tmp_path):
    write_parquet(tmp_path / "data" / "validation-00000-of-00001.parquet", {
        "image_id": ["x"], "question_id": [34602], "question": ["what is the BRAND?"], "image": [png()],
        "answers": [["nokia"] * 10], "set_name": ["val"]}, types={"question_id": pa.int32()})
    task = get_task("textvqa")
    ex = task.examples(tmp_path)[0]
    assert ex.id == "34602" and len(ex.answers) == 10
    # VLMEvalKit keeps the question as is (lmms-eval would capitalize() it)
    assert text_of(task, ex) == "<image>\nwhat is the BRAND?\nAnswer the question using a single word or phrase."


# ------------------------------------------------------------------------------------ errors


def test_missing_column_names_file_and_column(tmp_path):
    f = write_parquet(tmp_path / "data" / "validation-00000-of-00001.parquet",
                      {"questionId": ["1"], "question": ["q"], "image": [png()]})
    with pytest.raises(InputError, match=r"validation-00000-of-00001\.parquet: missing column 'answers'"):
        get_task("docvqa").examples(tmp_path)
    tsv = write_tsv(tmp_path / "X.tsv", ["index", "image", "answer"], [[1, b64(png()), "a"]])
    with pytest.raises(InputError, match=r"X\.tsv: missing column 'question'"):
        get_task("textvqa").examples(tsv)
    assert f.exists()


def test_missing_data_and_unmatched_split(tmp_path):
    with pytest.raises(InputError, match="nothing.tsv"):
        get_task("ocrbench").examples(tmp_path / "nothing.tsv")
    with pytest.raises(InputError, match="data not found"):
        get_task("ocrbench").examples(tmp_path / "no_dir")
    write_parquet(tmp_path / "data" / "test-00000-of-00001.parquet", {"question": ["q"]})
    with pytest.raises(InputError, match=r"no parquet file matches .*validation-\*\.parquet"):
        get_task("textvqa").examples(tmp_path)  # default split validation, only test present


def test_undecodable_image_names_the_row(tmp_path):
    tsv = write_tsv(tmp_path / "OCRBench.tsv", ["index", "image", "question", "answer", "category"], [
        [7, b64(b"not an image at all" * 10), "q", "['a']", "Doc-oriented VQA"]])
    ex = get_task("ocrbench").examples(tsv)[0]
    with pytest.raises(InputError, match=r"OCRBench\.tsv row 0 \(index=7\) column 'image': image cannot be decoded"):
        ex.images[0].load()
    bad_ref = write_tsv(tmp_path / "B.tsv", ["index", "image", "question", "answer", "category"],
                        [[1, "99", "q", "a", "x"]])
    with pytest.raises(InputError, match="refers to index '99'"):
        read_tsv(bad_ref)


def test_tsv_row_with_wrong_cell_count(tmp_path):
    path = tmp_path / "T.tsv"
    path.write_text("index\timage\tquestion\n1\tabc\n")
    with pytest.raises(InputError, match=r"T\.tsv line 2: 2 cells, header has 3"):
        read_tsv(path)


def test_duplicate_ids_are_refused(tmp_path):
    tsv = write_tsv(tmp_path / "TextVQA_VAL.tsv", ["index", "image", "question", "answer"],
                    [[1, b64(png()), "q", "a"], [1, b64(png()), "q", "a"]])
    with pytest.raises(InputError, match="duplicate example id '1'"):
        get_task("textvqa").examples(tsv)


# ------------------------------------------------------------------------------------ OCRBench


def test_ocrbench_parquet_and_tsv(tmp_path):
    write_parquet(tmp_path / "data" / "test-00000-of-00001.parquet", {
        "dataset": ["IIIT5K", "HME100k"], "question": ["what is written?", "Write the LaTeX."],
        "question_type": ["Regular Text Recognition", metrics.HMER], "answer": [["Hello"], ["x^2"]],
        "image": [png(), png()]})
    task = get_task("ocrbench")
    exs = task.examples(tmp_path)
    assert exs[1].extra == {"question_type": metrics.HMER, "dataset": "HME100k"}
    assert exs[0].categories == {"question_type": ["Regular Text Recognition"], "group": ["Text Recognition"]}
    assert text_of(task, exs[0]) == "<image>\nwhat is written?"
    assert task.score(exs[1], "x ^ 2") == 1.0 and task.score(exs[1], "X^2") == 0.0


# ------------------------------------------------------------------------------------ multiple choice


def test_ai2d_parquet_options_list_and_index_answer(tmp_path):
    write_parquet(tmp_path / "data" / "test-00000-of-00001.parquet", {
        "question": ["Which stage?"], "options": [["egg", "larva", "pupa", "adult"]], "answer": ["2"],
        "image": [png()]})
    task = get_task("ai2d")
    ex = task.examples(tmp_path)[0]
    assert ex.answers == "C" and ex.options == {"A": "egg", "B": "larva", "C": "pupa", "D": "adult"}
    assert text_of(task, ex) == ("<image>\nQuestion: Which stage?\nOptions:\nA. egg\nB. larva\nC. pupa\nD. adult\n"
                                 "Please select the correct answer from the options above.")
    assert task.score(ex, "C. pupa") == 1.0 and task.score(ex, "pupa") == 1.0 and task.score(ex, "B") == 0.0


def test_mmbench_tsv_hint_options_and_circular_groups(tmp_path):
    header = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image", "source",
              "l2-category", "comment", "split"]
    img = b64(png())
    tsv = write_tsv(tmp_path / "MMBench_DEV_EN.tsv", header, [
        [5, "Color?", "nan", "red", "blue", "", "", "A", "attr", img, "s", "FP-S", "", "dev"],
        [1000005, "Color?", "nan", "blue", "red", "", "", "B", "attr", "5", "s", "FP-S", "", "dev"],
        [6, "Count?", "Look closely.", "1", "2", "3", "None", "D", "count", img, "s", "CP", "", "dev"],
    ])
    task = get_task("mmbench")
    exs = task.examples(tsv)
    assert [(e.id, e.group) for e in exs] == [("5", "5"), ("1000005", "5"), ("6", "6")]
    assert exs[0].hint is None and exs[0].options == {"A": "red", "B": "blue"}  # "nan" hint, empty C/D dropped
    assert exs[2].options["D"] == "None"  # a real option text, not a missing value
    assert exs[0].categories == {"category": ["attr"], "l2-category": ["FP-S"]}
    assert text_of(task, exs[2]) == ("<image>\nHint: Look closely.\nQuestion: Count?\nOptions:\nA. 1\nB. 2\nC. 3\n"
                                     "D. None\nPlease select the correct answer from the options above.")
    assert [e.id for e in task.examples(tsv, limit=1)] == ["5", "1000005"]  # --limit counts questions


def test_mmstar_parquet_embedded_options(tmp_path):
    write_parquet(tmp_path / "mmstar.parquet", {
        "index": [0, 1], "question": ["Which animal?\nOptions: A: cat, B: dog, C: a bird, D: fish", "Odd text"],
        "image": [png(), png()], "answer": ["B", "A"], "category": ["coarse perception"] * 2,
        "l2_category": ["image scene"] * 2})
    task = get_task("mmstar")
    exs = task.examples(tmp_path)  # split val, but the single file is found by name
    assert exs[0].question == "Which animal?"
    assert exs[0].options == {"A": "cat", "B": "dog", "C": "a bird", "D": "fish"}
    assert exs[0].categories == {"category": ["coarse perception"], "l2-category": ["image scene"]}
    assert text_of(task, exs[1]) == ("<image>\nOdd text\n"
                                     "Answer with the option's letter from the given choices directly")
    assert task.score(exs[1], "A") == 1.0
    assert split_embedded_options("Q\nOptions: A: 1, C: 2") is None  # letters must run A, B, ...


# ------------------------------------------------------------------------------------ MMMU


def test_mmmu_prompt_matches_deepseek_wrapper(tmp_path):
    write_parquet(tmp_path / "Art_Theory" / "validation-00000-of-00001.parquet", {
        "id": ["validation_Art_Theory_1", "validation_Art_Theory_2", "validation_Art_Theory_3"],
        "question": ["What is shown in <image 1>?", "Compare <image 2> with <image 1>.", "How many?"],
        "options": ["['x', 'y']", "['same', 'different']", "[]"],
        "image_1": [png((10, 6)), png((10, 6)), png((12, 12))], "image_2": [None, png((4, 4)), None],
        "answer": ["A", "B", "7"], "question_type": ["multiple-choice", "multiple-choice", "open"]})
    task = get_task("mmmu")
    exs = task.examples(tmp_path)
    assert exs[0].categories == {"subject": ["Art_Theory"], "discipline": ["Art and Design"]}
    conv = task.prompt(exs[0])[0]
    # eval-datasets.md 3.9, word for word (note the space after the first newline)
    assert conv["content"] == ("<image>\n What is shown in <image 1>?\nA. x\nB. y\nAnswer with the option's letter "
                               "from the given choices directly. Answer the question using a single word or phrase.")
    assert conv["images"][0].size == (20, 12)  # first image upscaled 2x
    conv = task.prompt(exs[1])[0]  # images in order of appearance, renumbered
    assert conv["content"].startswith("<image><image>\n Compare <image 1> with <image 2>.\nA. same")
    assert [im.size for im in conv["images"]] == [(8, 8), (10, 6)]
    conv = task.prompt(exs[2])[0]  # open question: no options, no instruction, images in front
    assert conv["content"] == "<image>\n<image 1> How many?"
    assert task.score(exs[2], "It is 7") == 1.0 and task.score(exs[0], "A") == 1.0


def test_mmmu_tsv_keeps_requested_split(tmp_path):
    header = ["index", "id", "question", "A", "B", "answer", "image", "split", "category", "l2-category"]
    img = b64(png())
    tsv = write_tsv(tmp_path / "MMMU_DEV_VAL.tsv", header, [
        [1, "dev_Math_1", "q1", "1", "2", "A", img, "dev", "Math", "Science"],
        [2, "validation_Math_1", "q2 <image 1>", "1", "2", "B", f"['{img}', '{img}']", "validation", "Math", "Science"],
    ])
    task = get_task("mmmu")
    exs = task.examples(tsv)
    assert [e.id for e in exs] == ["2"] and len(exs[0].images) == 2
    assert exs[0].categories == {"subject": ["Math"], "discipline": ["Science"]}
    assert [e.id for e in task.examples(tsv, split="dev")] == ["1"]


# ------------------------------------------------------------------------------------ RefCOCO


def test_refcoco_parquet_explodes_expressions_and_converts_xywh(tmp_path):
    write_parquet(tmp_path / "data" / "val-00000-of-00001.parquet", {
        "question_id": ["298801"], "image": [png((200, 100))], "question": ["Provide a short description."],
        "answer": [["left dog", "brown dog"]], "segmentation": [[1.0, 2.0]], "bbox": [[10.0, 20.0, 50.0, 40.0]],
        "iscrowd": [0], "file_name": ["COCO_train2014_000000546154_298801.jpg"]},
        types={"segmentation": pa.list_(pa.float32()), "bbox": pa.list_(pa.float32()), "iscrowd": pa.int8()})
    task = get_task("refcoco")
    exs = task.examples(tmp_path)
    assert [(e.id, e.question) for e in exs] == [("298801/0", "left dog"), ("298801/1", "brown dog")]
    conv = task.prompt(exs[0])[0]
    assert conv["content"] == "<image>\n<|ref|>left dog<|/ref|>." and task.keeps_special_tokens(exs[0])
    # gold [10, 20, 60, 60] px; 0-999 box [50, 200, 300, 600] -> int(v/999*W): (10, 20, 60, 60)
    answer = "<|ref|>left dog<|/ref|><|det|>[[50, 200, 300, 600]]<|/det|>"
    assert task.score(exs[0], answer) == 1.0
    rec = task.record(exs[0], answer, answer)
    assert rec["answers"] == [10.0, 20.0, 60.0, 60.0] and rec["extra"]["pred_box"] == (10, 20, 60, 60)


def test_refcoco_tsv_filters_family_and_split(tmp_path):
    img = b64(png((100, 50)))
    tsv = write_tsv(tmp_path / "RefCOCO.tsv", ["index", "image", "question", "answer", "category"], [
        [0, img, "Locate <ref>the man</ref> in the image.", "[0.1, 0.2, 0.5, 0.6]", "RefCOCO val"],
        [1, "0", "Locate <ref>a cup</ref>.", "[0, 0, 1, 1]", "RefCOCO+ test-A"],
        [2, "0", "Locate <ref>the cup</ref>.", "[0, 0, 1, 1]", "RefCOCO testA"],
    ])
    exs = get_task("refcoco").examples(tsv)
    assert [(e.id, e.question) for e in exs] == [("0", "the man")]
    assert get_task("refcoco").score_extra(exs[0])["box"] == pytest.approx([10, 10, 50, 30])  # 0-1 x (W, H)
    assert [e.id for e in get_task("refcoco+").examples(tsv, split="testA")] == ["1"]
    assert [e.id for e in get_task("refcoco").examples(tsv, split="testA")] == ["2"]
    with pytest.raises(InputError, match="no refcocog examples for split 'val'"):
        get_task("refcocog").examples(tsv)


# ------------------------------------------------------------------------------------ demo


def test_demo_jsonl(tmp_path):
    (tmp_path / "images").mkdir()
    Image.new("RGB", (64, 48)).save(tmp_path / "images" / "a.png")
    rows = [
        {"id": "g0", "task": "demo_grounding", "image": "images/a.png",
         "prompt": "<image>\n<|ref|>the red circle<|/ref|>.",
         "answer": "<|ref|>the red circle<|/ref|><|det|>[[0, 0, 999, 999]]<|/det|>", "width": 64, "height": 48,
         "box": [0, 0, 63, 47]},
        {"id": "r0", "task": "demo_reading", "image": "images/a.png", "prompt": "<image>\nRead the word.",
         "answer": "apple", "width": 64, "height": 48},
    ]
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = get_task("demo")
    exs = task.examples(tmp_path)  # a folder means its data.jsonl
    assert [e.id for e in exs] == ["g0", "r0"]
    assert [task.keeps_special_tokens(e) for e in exs] == [True, False]
    assert task.prompt(exs[1])[0]["content"] == "<image>\nRead the word."
    assert task.score(exs[0], rows[0]["answer"]) == 1.0  # (0, 0, 64, 48) vs (0, 0, 63, 47): IoU 0.97
    assert task.score(exs[1], " Apple ") == 1.0
    assert [e.id for e in get_task("demo_reading").examples(tmp_path)] == ["r0"]
    rows[1]["image"] = "images/missing.png"
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(InputError, match=r"data\.jsonl line 2: image file not found"):
        task.examples(tmp_path)
