"""``dsvl2 ocr`` end to end on a generated multi-page PDF with a random DeepSeek-OCR 2 model, plus the
Markdown / region post-processing on hand-written model output."""

from __future__ import annotations

import dataclasses
import json
import pytest
import torch
from PIL import Image, ImageDraw

import dsvl2
from dsvl2.checkpoint import save_model
from dsvl2.cli import main
from dsvl2.config_ocr2 import read_config
from dsvl2.errors import InputError
from dsvl2.model.ocr2 import DeepseekOCR2
from dsvl2.ocr import OCRArgs, regions, run_ocr, to_markdown
from dsvl2.pipeline import Completion

pytest.importorskip("pypdfium2")


@pytest.fixture(scope="module")
def ocr_model_dir(tmp_path_factory, golden_dir):
    """The parity checkpoint's dims with the real vocabulary, random weights, an OCR-style tokenizer."""
    from reference import ocr2_checkpoint as oc

    d = tmp_path_factory.mktemp("ocr2-model")
    (d / "config.json").write_text(json.dumps(oc.config_json()))
    cfg = read_config(d)
    cfg = dataclasses.replace(cfg, language_config=dataclasses.replace(cfg.language_config, vocab_size=129280))
    torch.manual_seed(0)
    save_model(DeepseekOCR2(cfg).to(torch.bfloat16), d)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        text = (golden_dir / "checkpoints" / "micro-mha" / name).read_text()
        (d / name).write_text(text.replace("<|User|>", "<td>").replace("<|Assistant|>", "</td>"))
    return d


def make_pdf(path, pages: int = 3) -> None:
    images = []
    for n in range(pages):
        img = Image.new("RGB", (300, 400), "white")
        draw = ImageDraw.Draw(img)
        draw.text((20, 20), f"Page {n + 1}", fill="black")
        draw.rectangle((20, 60, 280, 120), outline="black")
        images.append(img)
    images[0].save(path, save_all=True, append_images=images[1:], resolution=72)


def test_pdf_to_markdown_end_to_end_and_resume(ocr_model_dir, tmp_path, monkeypatch):
    pdf = tmp_path / "paper.pdf"
    make_pdf(pdf)
    page = tmp_path / "scan.png"
    Image.new("RGB", (150, 100), "white").save(page)
    out = tmp_path / "out"
    assert main(["ocr", "--model", str(ocr_model_dir), str(pdf), str(page), "-o", str(out), "--dpi", "72",
                 "--batch-size", "2", "--max-new-tokens", "3", "--dtype", "fp32", "--quiet"]) == 0
    md = (out / "paper.md").read_text()
    assert md.count("<--- Page Split --->") == 2  # three pages
    meta = json.loads((out / "paper.json").read_text())
    assert [p["page"] for p in meta["pages"]] == [1, 2, 3] and meta["pages"][0]["size"] == [300, 400]
    for n in (1, 2, 3):
        assert Image.open(out / f"paper_p{n}.png").size == (300, 400)
    assert (out / "scan.md").is_file() and Image.open(out / "scan_p1.png").size == (150, 100)

    # a rerun with the same settings decodes nothing and rewrites the same files
    pipe = dsvl2.load(ocr_model_dir, dtype="fp32")
    calls = []

    def complete_batch(convs, **kw):
        calls.append(convs)
        return [Completion("<|ref|>title<|/ref|><|det|>[[0, 0, 500, 500]]<|/det|>\n# Redone", [], "stop", 1)
                for _ in convs]

    monkeypatch.setattr(pipe, "complete_batch", complete_batch)
    run_ocr(pipe, [pdf, page], out, OCRArgs(dpi=72, batch_size=2, max_new_tokens=3))
    assert calls == [] and (out / "paper.md").read_text() == md
    # a page whose cache is gone is decoded again, alone; the others come from the cache
    next((out / ".pages").glob("paper-*/page-0002.json")).unlink()
    run_ocr(pipe, [pdf, page], out, OCRArgs(dpi=72, batch_size=2, max_new_tokens=3))
    assert len(calls) == 1 and len(calls[0]) == 1
    pages = (out / "paper.md").read_text().split("\n<--- Page Split --->\n")
    assert pages[1] == "# Redone" and pages[0] == md.split("\n<--- Page Split --->\n")[0]
    assert json.loads((out / "paper.json").read_text())["pages"][1]["regions"][0]["label"] == "title"
    # other settings (here the prompt) make every page stale
    run_ocr(pipe, [pdf], out, OCRArgs(prompt="free", dpi=72, max_new_tokens=3))
    assert len(calls) == 4 and "Free OCR." in calls[-1][0][0]["content"]


def test_ocr_pipeline_defaults_to_the_no_repeat_rule(ocr_model_dir):
    pipe = dsvl2.load(ocr_model_dir, dtype="fp32")
    args = pipe.generate_args(max_new_tokens=5)
    td, td_end = pipe.tokenizer.token_id("<td>"), pipe.tokenizer.token_id("</td>")
    assert (args.no_repeat_ngram, args.no_repeat_window, args.no_repeat_whitelist) == (20, 90, (td, td_end))
    assert pipe.generate_args(no_repeat_ngram=0).no_repeat is None


def test_vl2_models_and_bad_inputs_are_refused(ocr_model_dir, golden_dir, tmp_path):
    with pytest.raises(InputError, match="DeepSeek-OCR 2"):
        run_ocr(dsvl2.load(golden_dir / "checkpoints" / "micro-mha", dtype="fp32"), [tmp_path], tmp_path / "o")
    pipe = dsvl2.load(ocr_model_dir, dtype="fp32")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(InputError, match="expected a .pdf or an image"):
        run_ocr(pipe, [tmp_path / "notes.txt"], tmp_path / "o")
    with pytest.raises(InputError, match="exactly one <image>"):
        OCRArgs(prompt="Convert this.")


PAGE = ("<|ref|>title<|/ref|><|det|>[[100, 50, 900, 120]]<|/det|>\n# Results\n\n"
        "<|ref|>image<|/ref|><|det|>[[0, 500, 499, 999]]<|/det|>\n\n\n\n"
        "<|ref|>text<|/ref|><|det|>[[100, 200, 900, 400]]<|/det|>\nWe define $a \\coloneqq b$.")


def test_markdown_strips_layout_and_links_image_regions(tmp_path):
    image = Image.new("RGB", (1000, 2000), "white")
    md = to_markdown(PAGE, image, tmp_path / "images", "doc_p1", keep_boxes=False)
    assert md == "# Results\n\n![](images/doc_p1_0.jpg)\n\nWe define $a := b$."
    assert Image.open(tmp_path / "images" / "doc_p1_0.jpg").size == (499, 999)  # int(v / 999 * side)
    assert to_markdown(PAGE, image, tmp_path, "x", keep_boxes=True) == PAGE


def test_regions_carry_label_boxes_and_following_text():
    found = regions(PAGE, 1000, 2000)
    assert [r["label"] for r in found] == ["title", "image", "text"]
    assert found[0]["box"] == [100, 50, 900, 120] and found[0]["box_px"] == [100, 100, 900, 240]
    assert found[0]["text"] == "# Results" and found[2]["text"] == "We define $a \\coloneqq b$."


def test_server_ocr_route_returns_markdown_and_regions_per_pdf_page(ocr_model_dir, tmp_path, monkeypatch):
    """``POST /v1/ocr`` with a 3-page PDF: the requested pages are decoded (each its own engine request)
    and answered with their Markdown and regions; the answer text is scripted so that the regions are known."""
    import base64

    httpx = pytest.importorskip("httpx")
    pytest.importorskip("fastapi")
    from dsvl2.serving import ServeArgs
    from dsvl2.serving.app import background_server, create_app

    pdf = tmp_path / "paper.pdf"
    make_pdf(pdf)
    pipe = dsvl2.load(ocr_model_dir, dtype="fp32")
    seen, real_processors, real_stream = [], pipe.processors, pipe.text_stream

    def processors(args, batch_size):  # what the engine asks for, per page
        seen.append(args.no_repeat_ngram)
        return real_processors(args, batch_size)

    class Scripted:  # the real model runs; its random answer is replaced by a known one at the end
        def __init__(self, inner):
            self.inner = inner

        def __getattr__(self, name):
            return getattr(self.inner, name)

        @property
        def completion(self):
            text = "<|ref|>text<|/ref|><|det|>[[0, 0, 499, 499]]<|/det|>\nrow"
            return dataclasses.replace(self.inner.completion, text=text)

    monkeypatch.setattr(pipe, "processors", processors)
    monkeypatch.setattr(pipe, "text_stream", lambda *a, **k: Scripted(real_stream(*a, **k)))
    url = "data:application/pdf;base64," + base64.b64encode(pdf.read_bytes()).decode()
    with background_server(create_app(pipe, ServeArgs())) as base:
        r = httpx.post(base + "/v1/ocr", json={"file": url, "dpi": 72, "max_tokens": 2, "pages": [1, 3]}, timeout=120)
        assert r.status_code == 200, r.text
        pages = r.json()["pages"]
        assert [p["page"] for p in pages] == [1, 3] and (pages[0]["width"], pages[0]["height"]) == (300, 400)
        assert pages[0]["markdown"] == "row" and pages[0]["regions"][0]["box_px"] == [0, 0, 149, 199]
        bad = httpx.post(base + "/v1/ocr", json={"file": url, "pages": [4]}, timeout=60)
        assert bad.status_code == 400 and "1..3" in bad.json()["error"]["message"]
    assert seen == [20, 20]  # two pages, each decoded with the no-repeat rule
