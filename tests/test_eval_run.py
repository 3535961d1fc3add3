"""The runner: end-to-end runs with a scripted fake model, resume after a killed run, the CLI entry
points, the paper suite, and one real run of a golden checkpoint through ``dsvl2.load``."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image
from test_eval_data import b64, png, write_parquet, write_tsv

from dsvl2.errors import InputError
from dsvl2.cli import eval as run  # the dsvl2 eval command (load_model lives there)
from dsvl2.cli.eval import add_eval_arguments, main
from dsvl2.evaluation.run import evaluate

REPO = Path(__file__).resolve().parents[1]


class FakeModel:
    """Answers by the size of the conversation's first image (unique per example in these tests).
    With ``skip_special_tokens`` the grounding tags are removed, as a real decode would."""

    def __init__(self, answers: dict, stall_after: int | None = None):
        self.answers, self.stall_after, self.calls = answers, stall_after, []

    def generate_batch(self, conversations, *, max_new_tokens=512, skip_special_tokens=True, chunk_size=None):
        if self.stall_after is not None and len(self.calls) >= self.stall_after:
            time.sleep(600)  # hangs mid-run until the test kills the process
        self.calls.append({"n": len(conversations), "skip": skip_special_tokens, "max_new_tokens": max_new_tokens})
        out = []
        for conv in conversations:
            text = self.answers[conv[0]["images"][0].size]
            if skip_special_tokens:
                for tag in ("<|ref|>", "<|/ref|>", "<|det|>", "<|/det|>"):
                    text = text.replace(tag, "")
            out.append(text)
        return out


def never():
    raise AssertionError("the model must not be loaded when every answer is already there")


# ------------------------------------------------------------------------------------ demo, end to end


def make_demo(root: Path) -> Path:
    """Six demo rows (two per task), image sizes (40+i, 30+i)."""
    (root / "images").mkdir(parents=True)
    rows = [
        ("g0", "demo_grounding", "<|ref|>the red circle<|/ref|>", [0, 0, 39, 29]),
        ("g1", "demo_grounding", "<|ref|>the blue square<|/ref|>", [0, 0, 20, 15]),
        ("r0", "demo_reading", "apple", None), ("r1", "demo_reading", "pear", None),
        ("c0", "demo_charts", "5", None), ("c1", "demo_charts", "3", None),
    ]
    with open(root / "data.jsonl", "w") as f:
        for i, (rid, kind, answer, box) in enumerate(rows):
            Image.new("RGB", (40 + i, 30 + i), (250, 250, 250)).save(root / "images" / f"{rid}.png")
            row = {"id": rid, "task": kind, "image": f"images/{rid}.png", "prompt": f"<image>\n{kind} question",
                   "answer": answer, "width": 40 + i, "height": 30 + i}
            if box:
                row["box"] = box
            f.write(json.dumps(row) + "\n")
    return root / "data.jsonl"


DEMO_ANSWERS = {
    (40, 30): "<|ref|>the red circle<|/ref|><|det|>[[0, 0, 999, 999]]<|/det|>",  # hit
    (41, 31): "<|ref|>the blue square<|/ref|><|det|>[[600, 600, 999, 999]]<|/det|>",  # miss
    (42, 32): " Apple", (43, 33): "peach",  # reading: right (case, space), wrong
    (44, 34): "5", (45, 35): "5.",  # charts: right; "5." is not the integer 3
}


def test_demo_end_to_end(tmp_path):
    data = make_demo(tmp_path / "demo")
    model = FakeModel(DEMO_ANSWERS)
    out = tmp_path / "out"
    summary = evaluate(model, "demo", data, out, batch_size=4, progress=False)
    assert summary["n"] == 6 and summary["score"] == pytest.approx(50.0)
    assert {k: v["score"] for k, v in summary["breakdown"]["task"].items()} == pytest.approx(
        {"demo_charts": 50.0, "demo_grounding": 50.0, "demo_reading": 50.0})
    # grounding is batched apart and decoded with special tokens kept
    assert sorted((c["n"], c["skip"]) for c in model.calls) == [(2, False), (4, True)]
    lines = (out / "predictions.jsonl").read_text().splitlines()
    records = {r["id"]: r for r in map(json.loads, lines)}
    assert len(lines) == 6 and records["g0"]["extra"]["pred_box"] == [0, 0, 40, 30]
    assert records["r0"] == {"id": "r0", "prediction": " Apple", "answer": " Apple", "score": 1.0, "answers": "apple",
                             "categories": {"task": ["demo_reading"]},
                             "extra": {"task": "demo_reading", "width": 42, "height": 32}}
    assert json.loads((out / "summary.json").read_text()) == summary
    table = (out / "results.md").read_text()
    assert "| demo | all | accuracy x 100 | 6 | 50.00 |" in table and "| demo_reading | 2 | 50.00 |" in table
    assert sorted(p.name for p in (out / "examples").iterdir()) == ["00_miss_g1.png", "01_hit_g0.png"]
    # a re-run finds everything done: the model is not even loaded, the summary is the same
    assert evaluate(never, "demo", data, out, progress=False) == summary


# ------------------------------------------------------------------------------------ benchmarks


def chartqa_tsv(path: Path, n: int = 4) -> Path:
    rows = [[i, b64(png((20 + i, 10))), f"q{i}?", ["12", "Yes", "100", "7"][i % 4],
             ["test_human", "test_augmented"][i % 2]] for i in range(n)]
    return write_tsv(path, ["index", "image", "question", "answer", "split"], rows)


CHART_ANSWERS = {(20, 10): "12.", (21, 10): "yes", (22, 10): "120", (23, 10): "7"}  # right, right, wrong, right


def test_chartqa_postprocess_and_splits(tmp_path):
    model = FakeModel(CHART_ANSWERS)
    summary = evaluate(model, "chartqa", chartqa_tsv(tmp_path / "ChartQA_TEST.tsv"), tmp_path / "out",
                       batch_size=3, max_new_tokens=16, progress=False)
    assert summary["score"] == 75.0 and summary["split"] == "test"
    assert summary["breakdown"]["split"] == {"augmented": {"n": 2, "score": 100.0}, "human": {"n": 2, "score": 50.0}}
    assert [c["n"] for c in model.calls] == [3, 1] and {c["max_new_tokens"] for c in model.calls} == {16}
    first = json.loads((tmp_path / "out" / "predictions.jsonl").read_text().splitlines()[0])
    assert (first["prediction"], first["answer"], first["score"]) == ("12.", "12", 1.0)  # wrapper's rstrip('.')


def test_ocrbench_counts_and_mmbench_circular(tmp_path):
    rows = [[i, b64(png((30 + i, 10))), "q", "['hello']", qtype] for i, qtype in
            enumerate(["Regular Text Recognition", "Digit String Recognition", "Doc-oriented VQA"])]
    tsv = write_tsv(tmp_path / "OCRBench.tsv", ["index", "image", "question", "answer", "category"], rows)
    model = FakeModel({(30, 10): "Hello!", (31, 10): "hell", (32, 10): "say hello"})
    summary = evaluate(model, "ocrbench", tsv, tmp_path / "ocr", progress=False)
    assert summary["score"] == 2.0 and summary["final_score_norm"] == 0.2  # a count, not a mean
    assert summary["breakdown"]["group"] == {"Doc-oriented VQA": {"n": 1, "score": 1.0},
                                             "Text Recognition": {"n": 2, "score": 1.0}}
    header = ["index", "question", "hint", "A", "B", "answer", "category", "image", "l2-category"]
    mm = write_tsv(tmp_path / "MMBench_DEV_EN.tsv", header, [
        [5, "q", "", "red", "blue", "A", "attr", b64(png((50, 10))), "FP-S"],
        [1000005, "q", "", "blue", "red", "B", "attr", b64(png((51, 10))), "FP-S"],
        [6, "q", "", "1", "2", "B", "count", b64(png((52, 10))), "CP"],
    ])
    model = FakeModel({(50, 10): "A", (51, 10): "A", (52, 10): "B"})  # group 5: second copy wrong
    summary = evaluate(model, "mmbench", mm, tmp_path / "mmb", progress=False)
    assert (summary["n"], summary["rows"], summary["score"]) == (2, 3, 50.0)
    assert summary["breakdown"]["category"] == {"attr": {"n": 1, "score": 0.0}, "count": {"n": 1, "score": 100.0}}


def test_refcoco_run_draws_examples(tmp_path):
    img = b64(png((100, 50)))
    tsv = write_tsv(tmp_path / "RefCOCO.tsv", ["index", "image", "question", "answer", "category"], [
        [0, img, "<ref>the man</ref>", "[0.1, 0.2, 0.5, 0.6]", "RefCOCO val"]])
    model = FakeModel({(100, 50): "<|ref|>the man<|/ref|><|det|>[[100, 200, 500, 600]]<|/det|>"})
    summary = evaluate(model, "refcoco", tsv, tmp_path / "out", progress=False)
    assert summary["score"] == 100.0 and model.calls[0]["skip"] is False
    drawn = list((tmp_path / "out" / "examples").iterdir())
    assert [p.name for p in drawn] == ["00_hit_0.png"] and Image.open(drawn[0]).size == (100, 50)


def test_progress_without_tqdm_prints_count_and_eta(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tqdm", None)  # import tqdm -> ImportError
    evaluate(FakeModel(CHART_ANSWERS), "chartqa", chartqa_tsv(tmp_path / "ChartQA_TEST.tsv"), tmp_path / "o")
    err = capsys.readouterr().err
    assert "chartqa/test: 4/4 (" in err and "ETA 0 s" in err


def test_importing_the_package_does_not_import_torch():
    code = "import sys, dsvl2.evaluation; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# ------------------------------------------------------------------------------------ resume


CHILD = """
import sys, time
sys.path.insert(0, {tests!r})
from test_eval_run import FakeModel, resume_answers
from dsvl2.evaluation.run import evaluate
evaluate(FakeModel(resume_answers(), stall_after=5), "chartqa", {data!r}, {out!r}, progress=False)
"""


def resume_answers():
    return {(20 + i, 10): ["12", "no", "99", "7.1"][i % 4] for i in range(12)}


def test_resume_after_killed_run_gives_the_same_summary(tmp_path):
    data = chartqa_tsv(tmp_path / "ChartQA_TEST.tsv", n=12)
    reference = evaluate(FakeModel(resume_answers()), "chartqa", data, tmp_path / "ref", progress=False)
    out = tmp_path / "killed"
    script = tmp_path / "child.py"
    script.write_text(CHILD.format(tests=str(Path(__file__).parent), data=str(data), out=str(out)))
    child = subprocess.Popen([sys.executable, str(script)], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    pred = out / "predictions.jsonl"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and child.poll() is None:
        if pred.exists() and pred.read_text().count("\n") >= 5:
            break
        time.sleep(0.02)
    assert child.poll() is None, f"child ended early: {child.stderr.read().decode()}"
    os.kill(child.pid, signal.SIGKILL)  # while it generates the 6th answer
    child.wait()
    assert pred.read_text().count("\n") == 5
    assert not (out / "summary.json").exists()
    model = FakeModel(resume_answers())
    resumed = evaluate(model, "chartqa", data, out, progress=False)
    assert sum(c["n"] for c in model.calls) == 7  # only what the killed run had not written
    assert resumed == reference
    ids = [json.loads(line)["id"] for line in pred.read_text().splitlines()]
    assert sorted(ids, key=int) == [str(i) for i in range(12)]  # each once


def test_torn_last_line_is_cut_and_redone(tmp_path):
    data = chartqa_tsv(tmp_path / "ChartQA_TEST.tsv")
    out = tmp_path / "out"
    evaluate(FakeModel(CHART_ANSWERS), "chartqa", data, out, limit=2, progress=False)
    with open(out / "predictions.jsonl", "a") as f:
        f.write('{"id": "2", "prediction": "12')  # a crash in the middle of a write
    model = FakeModel(CHART_ANSWERS)
    summary = evaluate(model, "chartqa", data, out, progress=False)
    assert summary["n"] == 4 and summary["score"] == 75.0 and sum(c["n"] for c in model.calls) == 2
    assert all(json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines())


def test_refuses_a_different_task_in_the_same_folder_and_bad_model_output(tmp_path):
    data = chartqa_tsv(tmp_path / "ChartQA_TEST.tsv")
    evaluate(FakeModel(CHART_ANSWERS), "chartqa", data, tmp_path / "out", limit=1, progress=False)
    with pytest.raises(InputError, match="holds a run of task 'chartqa'"):
        evaluate(FakeModel(CHART_ANSWERS), "docvqa", data, tmp_path / "out", progress=False)

    class Short(FakeModel):
        def generate_batch(self, conversations, **kw):
            return []

    with pytest.raises(InputError, match="returned 0 answers for 2"):
        evaluate(Short({}), "chartqa", data, tmp_path / "other", batch_size=2, progress=False)


# ------------------------------------------------------------------------------------ CLI and suite


def test_cli_entry_points(tmp_path, monkeypatch, capsys):
    import argparse

    parser = argparse.ArgumentParser(prog="dsvl2 eval")
    add_eval_arguments(parser)
    assert "dsvl2 eval --model" in parser.format_help()
    loads = []
    monkeypatch.setattr(run, "load_model", lambda m, d, dev: loads.append((m, d, dev)) or FakeModel(CHART_ANSWERS))
    data = chartqa_tsv(tmp_path / "ChartQA_TEST.tsv")
    argv = ["--model", "M", "--task", "chartqa", "--data", str(data), "--out", str(tmp_path / "o"), "--no-progress",
            "--dtype", "fp32", "--device", "cpu"]
    assert main(argv) == 0
    assert loads == [("M", "fp32", "cpu")]
    assert "| chartqa | test | relaxed accuracy x 100 | 4 | 75.00 |" in capsys.readouterr().out
    assert main(argv[:5] + [str(tmp_path / "missing.tsv")] + argv[6:]) == 2  # an input error
    assert "missing.tsv" in capsys.readouterr().err


def test_paper_suite(tmp_path, monkeypatch, capsys):
    root = tmp_path / "LMUData"
    root.mkdir()
    chartqa_tsv(root / "ChartQA_TEST.tsv")
    write_tsv(root / "OCRBench.tsv", ["index", "image", "question", "answer", "category"],
              [[0, b64(png((60, 10))), "q", "['hi']", "Doc-oriented VQA"]])
    write_parquet(root / "ai2d" / "data" / "test-00000-of-00001.parquet", {
        "question": ["q"], "options": [["x", "y"]], "answer": ["1"], "image": [png((61, 10))]})
    answers = {**CHART_ANSWERS, (60, 10): "hi", (61, 10): "B"}
    loads = []
    monkeypatch.setattr(run, "load_model", lambda *a: loads.append(a) or FakeModel(answers))
    assert main(["--model", "ckpt/deepseek-vl2-small", "--suite", "paper", "--data", str(root),
                 "--out", str(tmp_path / "paper"), "--no-progress"]) == 0
    out, err = capsys.readouterr()
    assert len(loads) == 1  # one model for the whole suite
    assert "| ChartQA | test | relaxed accuracy x 100 | 4 | 75.00 | 84.50 | 84.48 |" in out
    assert "| OCRBench | test | correct answers (of 1000) | 1 | 1 | 834 | 835 |" in out
    assert "| AI2D | test | accuracy x 100 | 1 | 100.00 | 80.00 | 79.00 |" in out
    assert out.index("OCR-related") < out.index("ChartQA") < out.index("General") < out.index("AI2D")
    assert "no data for docvqa" in err and "DocVQA" not in out
    assert (tmp_path / "paper" / "paper.md").read_text() == out
    saved = json.loads((tmp_path / "paper" / "paper.json").read_text())
    assert set(saved) == {"chartqa/test", "ocrbench/test", "ai2d/test"}


# ------------------------------------------------------------------------------------ a real model


def test_golden_checkpoint_end_to_end(tmp_path, golden_dir, capsys):
    """micro-mha (random weights) loaded by ``dsvl2.load`` through the CLI path: the answers are
    noise, the plumbing is real (grounding decoded with special tokens, text without)."""
    pytest.importorskip("dsvl2.pipeline")
    data = make_demo(tmp_path / "demo")
    model = str(golden_dir / "checkpoints" / "micro-mha")
    argv = ["--model", model, "--dtype", "fp32", "--device", "cpu", "--max-new-tokens", "3", "--no-progress",
            "--task", "demo", "--data", str(data), "--limit", "3", "--batch-size", "2", "--out", str(tmp_path / "o")]
    assert main(argv) == 0
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    records = [json.loads(line) for line in (tmp_path / "o" / "predictions.jsonl").read_text().splitlines()]
    assert summary["n"] == 3 == len(records) and all(isinstance(r["prediction"], str) for r in records)
    assert sorted(r["id"] for r in records) == ["g0", "g1", "r0"]
    assert len(list((tmp_path / "o" / "examples").iterdir())) == 2
    assert "| demo | all | accuracy x 100 | 3 |" in capsys.readouterr().out
