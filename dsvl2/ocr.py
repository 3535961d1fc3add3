"""``dsvl2 ocr``: PDFs and page images -> Markdown, box drawings and region JSON with DeepSeek-OCR 2.

What the official ``run_dpsk_ocr2_pdf.py`` / ``run_dpsk_ocr2_image.py`` do, as a library function a
user can call (:func:`run_ocr`; the command is ``dsvl2/cli/ocr.py``): PDF pages rendered with pypdfium2 at ``dpi`` (the
official scripts use PyMuPDF at 144 dpi; pypdfium2 is permissively licensed), the prompt
``<image>\\n<|grounding|>Convert the document to markdown.`` (or ``<image>\\nFree OCR.``), greedy
decoding with the no-repeat rule, pages batched across documents. Per document, in ``out/``:

- ``<name>.md``: the pages' Markdown joined by ``<--- Page Split --->`` lines; layout spans
  ``<|ref|>label<|/ref|><|det|>[[...]]<|/det|>`` removed (``--keep-boxes`` keeps them), ``image``
  regions cropped to ``images/<name>_p<N>_<k>.jpg`` and linked, as the official script does;
- ``<name>_p<N>.png``: the page with every region outlined and labelled;
- ``<name>.json``: per page, every region's label, 0-999 box, pixel box and the text that follows it.

Resumable: each page's raw output is kept under ``out/.pages/<name>/`` with the settings that made
it; a rerun skips pages already done with the same settings and rebuilds the document files.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from .errors import InputError
from .processing.grounding import Box, draw_boxes, parse_grounding
from .processing.ocr2 import PROMPTS, load_document_image

PAGE_SPLIT = "\n<--- Page Split --->\n"
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif"}
_SPAN = re.compile(r"<\|ref\|>(.*?)<\|/ref\|><\|det\|>(.*?)<\|/det\|>", re.DOTALL)


@dataclass(frozen=True)
class OCRArgs:
    prompt: str = "markdown"  # "markdown", "free", or a prompt of your own with one <image>
    dpi: int = 144
    batch_size: int = 1
    max_new_tokens: int = 8192
    keep_boxes: bool = False
    no_repeat_ngram: int = 20
    no_repeat_window: int = 90

    def __post_init__(self) -> None:
        if self.dpi < 18 or self.dpi > 1200:
            raise InputError(f"dpi must be in 18..1200, got {self.dpi}")
        if self.batch_size < 1:
            raise InputError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.prompt_text.count("<image>") != 1:
            raise InputError(f"the OCR prompt needs exactly one <image> tag: {self.prompt_text!r}")

    @property
    def prompt_text(self) -> str:
        return PROMPTS.get(self.prompt, self.prompt)

    def fingerprint(self) -> str:
        """What a cached page depends on (not the batch size, not how boxes are written)."""
        keys = ("prompt", "dpi", "max_new_tokens", "no_repeat_ngram", "no_repeat_window")
        return json.dumps({k: asdict(self)[k] for k in keys} | {"prompt": self.prompt_text}, sort_keys=True)


# ---- inputs -----------------------------------------------------------------------------------
class Document:
    """A PDF (pages rendered on demand) or a single image file."""

    def __init__(self, path: str | Path, dpi: int):
        self.path = Path(path)
        self.dpi = dpi
        if not self.path.is_file():
            raise InputError(f"input not found: {self.path}")
        suffix = self.path.suffix.lower()
        self._pdf = None
        if suffix == ".pdf":
            try:
                import pypdfium2
            except ImportError as e:
                raise InputError("reading PDFs needs pypdfium2: pip install 'dsvl2[ocr]'") from e
            try:
                self._pdf = pypdfium2.PdfDocument(str(self.path))
            except pypdfium2.PdfiumError as e:
                raise InputError(f"cannot read PDF {self.path}: {e}") from e
            self.pages = len(self._pdf)
        elif suffix in IMAGE_SUFFIXES:
            self.pages = 1
        else:
            raise InputError(f"{self.path}: expected a .pdf or an image ({', '.join(sorted(IMAGE_SUFFIXES))})")

    @property
    def name(self) -> str:
        return self.path.stem

    def page(self, index: int) -> Image.Image:
        if self._pdf is None:
            return load_document_image(self.path)
        bitmap = self._pdf[index].render(scale=self.dpi / 72)
        return bitmap.to_pil().convert("RGB")

    def close(self) -> None:
        if self._pdf is not None:
            self._pdf.close()


# ---- outputs ----------------------------------------------------------------------------------
def regions(text: str, width: int, height: int) -> list[dict[str, Any]]:
    """Every ``<|ref|>label<|/ref|><|det|>boxes<|/det|>`` span: label, boxes and the text after it."""
    spans = list(_SPAN.finditer(text))
    out = []
    for n, m in enumerate(spans):
        end = spans[n + 1].start() if n + 1 < len(spans) else len(text)
        for box in parse_grounding(m.group(0)).boxes:
            out.append({"label": box.label, "box": [box.x1, box.y1, box.x2, box.y2],
                        "box_px": list(box.to_pixels(width, height)), "text": text[m.end():end].strip()})
    return out


def to_markdown(text: str, image: Image.Image, crops_dir: Path | None, stem: str, keep_boxes: bool) -> str:
    """The page's Markdown: layout spans removed (or kept), ``image`` regions cropped and linked
    (``crops_dir`` None: no crops written, figure spans removed like the others)."""
    if keep_boxes:
        return text
    count = 0

    def replace(m: re.Match) -> str:
        nonlocal count
        if m.group(1).strip() != "image" or crops_dir is None:
            return ""
        boxes = parse_grounding(m.group(0)).boxes
        if not boxes:
            return ""
        x1, y1, x2, y2 = boxes[0].to_pixels(*image.size)
        if x2 <= x1 or y2 <= y1:
            return ""
        crops_dir.mkdir(parents=True, exist_ok=True)
        name = f"{stem}_{count}.jpg"
        image.crop((x1, y1, x2, y2)).save(crops_dir / name, quality=95)
        count += 1
        return f"![](images/{name})\n"

    md = _SPAN.sub(replace, text)
    md = md.replace("\\coloneqq", ":=").replace("\\eqqcolon", "=:")
    return re.sub(r"\n{3,}", "\n\n", md).strip()


def _cache_file(out: Path, doc: Document, index: int) -> Path:
    digest = hashlib.sha256(str(doc.path.resolve()).encode()).hexdigest()[:8]
    return out / ".pages" / f"{doc.name}-{digest}" / f"page-{index + 1:04d}.json"


def _cached(path: Path, fingerprint: str) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if data.get("settings") == fingerprint else None


def write_document(doc: Document, pages: list[dict], out: Path, args: OCRArgs) -> None:
    """``<name>.md``, ``<name>.json`` and one ``<name>_p<N>.png`` drawing per page."""
    md_pages, json_pages = [], []
    for index, page in enumerate(pages):
        image = doc.page(index)
        stem = f"{doc.name}_p{index + 1}"
        found = regions(page["text"], *image.size)
        boxes = [Box(r["label"], *r["box"]) for r in found]
        draw_boxes(image, boxes).save(out / f"{stem}.png")
        md_pages.append(to_markdown(page["text"], image, out / "images", stem, args.keep_boxes))
        json_pages.append({"page": index + 1, "size": list(image.size), "finish_reason": page["finish_reason"],
                           "regions": found})
    (out / f"{doc.name}.md").write_text(PAGE_SPLIT.join(md_pages) + "\n", encoding="utf-8")
    (out / f"{doc.name}.json").write_text(json.dumps({"source": str(doc.path), "pages": json_pages},
                                                     indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


def run_ocr(pipe, inputs: Sequence[str | Path], out: str | Path, args: OCRArgs = OCRArgs(),
            progress: Callable[[int, int, str], None] | None = None) -> list[Path]:
    """OCR every page of ``inputs`` into ``out``; returns the Markdown files written.

    ``progress(done, total, label)`` is called after each page (cached pages count as done).
    """
    from .model.ocr2 import DeepseekOCR2

    if not isinstance(pipe.model, DeepseekOCR2):
        raise InputError("dsvl2 ocr needs a DeepSeek-OCR 2 model directory (vision_config.model_name "
                         "'deepencoderv2')")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    docs = [Document(p, args.dpi) for p in inputs]
    names = [d.name for d in docs]
    if len(set(names)) != len(names):
        raise InputError(f"two inputs share a name ({sorted({n for n in names if names.count(n) > 1})}): "
                         "their outputs would overwrite each other")
    fingerprint = args.fingerprint()
    todo = [(d, i) for d in docs for i in range(d.pages) if _cached(_cache_file(out, d, i), fingerprint) is None]
    total, done = sum(d.pages for d in docs), sum(d.pages for d in docs) - len(todo)
    if progress:
        progress(done, total, "cached")
    gen = dict(max_new_tokens=args.max_new_tokens, no_repeat_ngram=args.no_repeat_ngram,
               no_repeat_window=args.no_repeat_window, no_repeat_whitelist=pipe.table_token_ids())
    try:
        for start in range(0, len(todo), args.batch_size):
            chunk = todo[start:start + args.batch_size]
            convs = [[{"role": "user", "content": args.prompt_text, "images": [d.page(i)]}] for d, i in chunk]
            for (d, i), c in zip(chunk, pipe.complete_batch(convs, skip_special_tokens=False, **gen), strict=True):
                path = _cache_file(out, d, i)
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_suffix(".tmp")
                tmp.write_text(json.dumps({"settings": fingerprint, "text": c.text, "finish_reason": c.finish_reason,
                                           "tokens": c.completion_tokens}))
                tmp.replace(path)
                done += 1
                if progress:
                    progress(done, total, f"{d.name} p{i + 1}")
        written = []
        for d in docs:
            pages = [_cached(_cache_file(out, d, i), fingerprint) for i in range(d.pages)]
            write_document(d, pages, out, args)  # type: ignore[arg-type]
            written.append(out / f"{d.name}.md")
        return written
    finally:
        for d in docs:
            d.close()
