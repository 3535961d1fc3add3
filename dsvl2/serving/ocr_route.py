"""``POST /v1/ocr``: a PDF or a page image in, the pages' Markdown and layout regions out (DeepSeek-OCR 2).

Request JSON: ``{"file": "data:application/pdf;base64,..." | an image URL as in chat messages,
"prompt": "markdown" | "free" | a prompt with one <image>, "dpi": 144, "max_tokens": 4096,
"pages": [1, 3] (optional, 1-based)}``. Each page becomes its own engine request (so pages of one
file, and of concurrent requests, are batched together), decoded greedily with the official
no-repeat rule. Response: ``{"object": "ocr", "model", "pages": [{"page", "width", "height",
"markdown", "text", "regions": [{"label", "box", "box_px", "text"}], "finish_reason",
"completion_tokens"}]}``: ``text`` is the raw answer with its layout spans, ``markdown`` has them
removed (figure regions included, since the server writes no crops). Registered only for OCR models.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from PIL import Image
from starlette.concurrency import run_in_threadpool

from ..errors import InputError
from ..ocr import OCRArgs, regions, to_markdown
from ..pipeline import Pipeline
from .engine import EngineRequest, EngineStopped, QueueFull
from .protocol import APIError, ImagePolicy, invalid, load_image_url

MAX_PAGES = 64


def decode_pages(body: dict[str, Any], policy: ImagePolicy) -> tuple[list[tuple[int, Image.Image]], OCRArgs]:
    """(1-based page number, RGB image) for the requested pages, and the OCR settings."""
    if not isinstance(body, dict) or not isinstance(body.get("file"), str) or not body["file"]:
        raise invalid("'file' must be a data: URL of a PDF or an image", "file", "invalid_type", 422)
    try:
        opts = OCRArgs(prompt=body.get("prompt", "markdown"), dpi=int(body.get("dpi", 144)),
                       max_new_tokens=int(body.get("max_tokens", 4096)))
    except (InputError, TypeError, ValueError) as exc:
        raise invalid(str(exc), code="invalid_value") from exc
    url: str = body["file"]
    if url.startswith("data:application/pdf"):
        pages = _pdf_pages(url, opts.dpi, policy)
    else:
        pages = [load_image_url(url, policy, "file")]
    wanted = body.get("pages") or list(range(1, len(pages) + 1))
    if not isinstance(wanted, list) or not all(isinstance(p, int) and 1 <= p <= len(pages) for p in wanted):
        raise invalid(f"'pages' must list page numbers in 1..{len(pages)}", "pages", "invalid_value")
    if len(wanted) > MAX_PAGES:
        raise invalid(f"{len(wanted)} pages requested, over the limit of {MAX_PAGES} per request", "pages",
                      "too_many_pages")
    return [(p, pages[p - 1]) for p in wanted], opts


def _pdf_pages(url: str, dpi: int, policy: ImagePolicy) -> list[Image.Image]:
    try:
        import pypdfium2
    except ImportError as exc:
        raise APIError(501, "this server cannot read PDFs (install the 'ocr' extra: pypdfium2)",
                       code="pdf_not_supported", type="server_error") from exc
    header, _, payload = url[5:].partition(",")
    if not header.endswith(";base64"):
        raise invalid("PDF data URLs must look like data:application/pdf;base64,<data>", "file", "invalid_file_url")
    try:
        raw = base64.b64decode("".join(payload.split()), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise invalid(f"the PDF data URL is not valid base64: {exc}", "file", "invalid_base64") from exc
    if len(raw) > policy.max_bytes:
        raise invalid(f"PDF is {len(raw)} bytes, over the limit of {policy.max_bytes}", "file", "file_too_large", 413)
    try:
        pdf = pypdfium2.PdfDocument(raw)
    except pypdfium2.PdfiumError as exc:
        raise invalid(f"cannot read the PDF: {exc}", "file", "invalid_pdf") from exc
    try:
        pages = []
        for page in pdf:
            w, h = (v * dpi / 72 for v in page.get_size())
            if w * h > policy.max_pixels:
                raise invalid(f"a page at {dpi} dpi is {w:.0f}x{h:.0f} pixels, over the limit of {policy.max_pixels}",
                              "dpi", "image_too_large", 413)
            pages.append(page.render(scale=dpi / 72).to_pil().convert("RGB"))
        return pages
    finally:
        pdf.close()


def _prepare(pipe: Pipeline, conversation: list[dict[str, Any]]):
    conv = pipe.conversation(conversation)
    return conv, pipe.prepare([conv])


def add_ocr_route(app: FastAPI, pipe: Pipeline, policy: ImagePolicy, model_id: str, max_body: int) -> None:
    from .app import _read_json, _wait_done  # the chat route's helpers (imported here: no cycle at import time)

    engine = app.state.engine

    @app.post("/v1/ocr", response_model=None)
    async def ocr(request: Request) -> JSONResponse:
        body = await _read_json(request, max_body)
        pages, opts = await run_in_threadpool(decode_pages, body, policy)
        loop = asyncio.get_running_loop()
        waits = []
        for number, image in pages:
            conversation = [{"role": "user", "content": opts.prompt_text, "images": [image]}]
            try:
                conv, batch = await run_in_threadpool(_prepare, pipe, conversation)
            except InputError as exc:
                raise invalid(str(exc), "file", "invalid_page") from exc
            events: asyncio.Queue = asyncio.Queue()

            def on_event(event, q=events) -> None:
                with contextlib.suppress(RuntimeError):
                    loop.call_soon_threadsafe(q.put_nowait, event)

            args = pipe.generate_args(max_new_tokens=opts.max_new_tokens)
            ereq = EngineRequest(conv, batch, args, (), on_event, skip_special_tokens=False)
            try:
                engine.submit(ereq)
            except (QueueFull, EngineStopped) as exc:
                raise APIError(503, f"the server is busy, retry later: {exc}", code="server_overloaded",
                               type="server_error") from exc
            waits.append((number, image, _wait_done(events, ereq, request)))
        results = await asyncio.gather(*(w for _, _, w in waits))
        out = []
        for (number, image, _), completion in zip(waits, results):
            if completion is None:
                return JSONResponse({}, status_code=499)
            text = completion.text
            out.append({"page": number, "width": image.width, "height": image.height,
                        "markdown": to_markdown(text, image, None, f"p{number}", keep_boxes=False), "text": text,
                        "regions": regions(text, *image.size), "finish_reason": completion.finish_reason,
                        "completion_tokens": completion.completion_tokens})
        return JSONResponse({"object": "ocr", "model": model_id, "pages": out})
