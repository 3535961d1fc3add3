"""The HTTP server over a live uvicorn on 127.0.0.1: routes, limits, error objects, API key,
cancellation, queue overflow; plus the protocol helpers by hand (the engine: test_serving_engine.py).

Also holds the helpers the other server tests import (``ScriptedPipeline``, ``png_data_url``...):
the golden micro checkpoint has random weights, so grounded answers are scripted for prompts that
ask for them, while every other prompt runs the real model.
"""

from __future__ import annotations

import base64
import functools
import io
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image, ImageDraw

import dsvl2
from dsvl2.pipeline import Completion, Pipeline

httpx = pytest.importorskip("httpx", reason="the server tests need the test extra (httpx)")
pytest.importorskip("fastapi", reason="the server tests need the serve extra (fastapi)")
pytest.importorskip("uvicorn", reason="the server tests need the serve extra (uvicorn)")

from dsvl2.serving import ServeArgs
from dsvl2.serving.app import background_server, create_app
from dsvl2.serving.protocol import APIError, ChatRequest, grounding_entries

BOX_A, BOX_B = [100, 200, 500, 700], [600, 300, 900, 800]
TIMEOUT = 60.0


class ScriptedPipeline(Pipeline):
    """The real pipeline, except that a row whose last user turn asks for grounding (``<|ref|>`` or
    ``<|grounding|>``) or says ``SLOW`` gets a scripted answer in place of the model's text, streamed
    in small pieces as tokens arrive (``SLOW`` waits for :attr:`gate` first, for queue tests)."""

    gate = threading.Event()  # open except while test_full_queue_is_503 holds it shut

    def text_stream(self, batch: Any, row: int, stop: Any, skip_special_tokens: bool) -> Any:
        tail = batch.sft_format[row].rsplit("user:", 1)[-1]
        text = _script(tail)
        if text is None:
            return super().text_stream(batch, row, stop, skip_special_tokens)
        return _ScriptedStream(text, "SLOW" in tail, int(batch.attention_mask[row].sum()))


class _ScriptedStream:
    """A ``TextStream`` that ignores the model's tokens: one 7-character piece of the script per token,
    the rest at ``finish``."""

    def __init__(self, text: str, slow: bool, prompt: int) -> None:
        self.text, self.slow, self.prompt, self.emitted, self.done = text, slow, prompt, 0, False

    def push(self, token: int) -> str:
        if self.slow and self.emitted == 0:
            assert ScriptedPipeline.gate.wait(TIMEOUT), "the test never opened the gate"
        time.sleep(0.01)
        piece = self.text[self.emitted:self.emitted + 7]
        self.emitted += len(piece)
        self.done = self.emitted >= len(self.text)
        return piece

    def finish(self) -> str:
        self.done = True
        rest, self.emitted = self.text[self.emitted:], len(self.text)
        return rest

    @property
    def completion(self) -> Completion:
        return Completion(self.text, list(range(len(self.text) // 4)), "stop", self.prompt)


ScriptedPipeline.gate.set()


def _script(tail: str) -> str | None:
    if "SLOW" in tail:
        return "a slow scripted answer"
    if "<|grounding|>" in tail:
        return (f"The <|ref|>red square<|/ref|><|det|>[{BOX_A}]<|/det|> sits left of the "
                f"<|ref|>blue circle<|/ref|><|det|>[{BOX_B}]<|/det|>.")
    if "<|ref|>" in tail:
        label = tail.split("<|ref|>", 1)[1].split("<|/ref|>", 1)[0]
        return f"<|ref|>{label}<|/ref|><|det|>[{BOX_A}]<|/det|>"
    return None


def px(box: list[int], size: tuple[int, int]) -> list[int]:
    """0-999 corners -> pixels of a ``size`` image, by the spec 9.1 rule ``int(v / 999 * W)``."""
    w, h = size
    return [int(box[0] / 999 * w), int(box[1] / 999 * h), int(box[2] / 999 * w), int(box[3] / 999 * h)]


def scene_image(size: tuple[int, int] = (480, 320)) -> Image.Image:
    """A red square exactly at BOX_A and a blue circle at BOX_B (0-999 coordinates)."""
    img = Image.new("RGB", size, (235, 235, 225))
    draw = ImageDraw.Draw(img)
    draw.rectangle(px(BOX_A, size), fill=(210, 40, 40))
    draw.ellipse(px(BOX_B, size), fill=(40, 70, 210))
    return img


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def png_data_url(img: Image.Image | tuple[int, int] = (32, 24), color: tuple[int, int, int] = (200, 30, 30)) -> str:
    img = img if isinstance(img, Image.Image) else Image.new("RGB", img, color)
    return "data:image/png;base64," + base64.b64encode(png_bytes(img)).decode()


def user(text: str, *urls: str) -> dict[str, Any]:
    parts: list[dict[str, Any]] = [{"type": "text", "text": text}]
    return {"role": "user", "content": parts + [{"type": "image_url", "image_url": {"url": u}} for u in urls]}


@functools.lru_cache(maxsize=1)
def load_micro(golden_dir: Path) -> ScriptedPipeline:
    """One pipeline for every server / CLI test module of the session (read-only use)."""
    pipe = dsvl2.load(golden_dir / "checkpoints" / "micro-mha", dtype="fp32", device="cpu")
    return ScriptedPipeline(pipe.model, pipe.processor, pipe.model_dir)


TEST_ARGS = ServeArgs(max_images=2, max_image_pixels=300 * 300, max_body_bytes=2 * 2**20, max_context=1024,
                      default_max_tokens=4, max_batch_size=16)


@pytest.fixture(scope="module")
def pipe(golden_dir: Path) -> ScriptedPipeline:
    return load_micro(golden_dir)


@pytest.fixture(scope="module")
def server(pipe: ScriptedPipeline) -> Iterator[str]:
    with background_server(create_app(pipe, TEST_ARGS)) as base:
        yield base


def post(base: str, body: Any, timeout: Any = TIMEOUT, **kw: Any) -> httpx.Response:
    key = "content" if isinstance(body, (bytes, str)) else "json"
    return httpx.post(base + "/v1/chat/completions", **{key: body}, timeout=timeout, **kw)


def valid(**extra: Any) -> dict[str, Any]:
    return {"model": "micro-mha", "messages": [user("Hello")], "max_tokens": 2, **extra}


# ---- routes ----------------------------------------------------------------------------------------
def test_health_models_and_page(server: str) -> None:
    health = httpx.get(server + "/health").json()
    assert health["status"] == "ok"
    assert health["plan"]["exact"] is False and health["plan"]["fused_attention"] is True  # fast by default
    assert any(line.startswith("kernels: none") for line in health["plan"]["why"])  # an fp32 model: torch only
    models = httpx.get(server + "/v1/models").json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == ["micro-mha"]
    assert models["data"][0]["max_model_len"] == 1024
    assert httpx.get(server + "/v1/models/micro-mha").json()["id"] == "micro-mha"
    assert httpx.get(server + "/v1/models/gpt-4").status_code == 404
    page = httpx.get(server + "/")
    assert page.status_code == 200 and "<title>dsvl2 chat</title>" in page.text
    assert httpx.get(server + "/static/app.js").status_code == 200


def test_completion_shape_and_usage(server: str, pipe: ScriptedPipeline) -> None:
    r = post(server, {"messages": [user("What is it?", png_data_url())], "max_tokens": 3})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion" and body["model"] == "micro-mha"
    choice = body["choices"][0]
    assert choice["message"]["role"] == "assistant" and choice["finish_reason"] in ("stop", "length")
    conv = pipe.conversation([{"role": "user", "content": "What is it?", "images": [Image.new("RGB", (32, 24))]}])
    prompt = pipe.prepare([conv]).input_ids.shape[1]
    assert body["usage"]["prompt_tokens"] == prompt
    assert body["usage"]["total_tokens"] == prompt + body["usage"]["completion_tokens"] <= prompt + 3
    assert "grounding" not in choice["message"]


BAD = [  # (body, status, code, param)
    (b"{not json", 400, "invalid_json", None),
    (b"[1, 2]", 422, "invalid_type", None),
    ({"model": "micro-mha"}, 422, "invalid_type", "messages"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, 400, "invalid_value", "messages[0].role"),
    ({"messages": [user("hi")], "stream": "yes"}, 422, "invalid_type", "stream"),
    ({"messages": [user("hi")], "n": 2}, 400, "unsupported_parameter", "n"),
    ({"messages": [user("hi")], "temperature": -1}, 400, "invalid_value", "temperature"),
    ({"messages": [user("hi")], "temperature": 1, "seed": 2**70}, 400, "invalid_value", "seed"),
    ({"messages": [user("hi")], "tools": [{"type": "function"}]}, 400, "unsupported_parameter", "tools"),
    ({"messages": [user("look", "data:image/png;base64,@@not-base64@@")]}, 400, "invalid_base64", None),
    ({"messages": [user("look", "data:image/png;base64," + base64.b64encode(b"just some text").decode())]},
     400, "invalid_image", None),
    ({"messages": [user("look", png_data_url(), png_data_url(), png_data_url())]}, 400, "too_many_images", None),
    ({"messages": [user("look", png_data_url((400, 400)))]}, 413, "image_too_large", None),
    ({"messages": [user("look", png_data_url((290, 1)))]}, 400, "invalid_image", None),  # 290:1
    ({"messages": [user("look", "https://example.com/cat.png")]}, 400, "image_url_not_allowed", None),
    ({"messages": [user("look", "/etc/passwd")]}, 400, "image_url_not_allowed", None),
    ({"messages": [user("<image> <image> two tags", png_data_url())]}, 400, "invalid_messages", "messages"),
    ({"messages": [{"role": "assistant", "content": [{"type": "image_url", "image_url": {"url": png_data_url()}}]}]},
     400, "invalid_value", None),
    ({"model": "gpt-4o", "messages": [user("hi")]}, 404, "model_not_found", "model"),
    ({"messages": [user("word " * 1100)]}, 400, "context_length_exceeded", "messages"),
    ({"messages": [user("hi")], "max_tokens": 5000}, 400, "context_length_exceeded", "max_tokens"),
    (b'{"messages": "' + b"x" * (3 * 2**20) + b'"}', 413, "request_too_large", None),
]


@pytest.mark.parametrize("body,status,code,param", BAD, ids=[f"{b[1]}-{b[2]}" for b in BAD])
def test_bad_request_then_still_serving(server: str, body: Any, status: int, code: str, param: str | None) -> None:
    r = post(server, body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == code and error["message"]
    if param is not None:
        assert error["param"] == param
    ok = post(server, valid())
    assert ok.status_code == 200, ok.text


def test_unknown_route_and_method(server: str) -> None:
    r = httpx.get(server + "/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    r = httpx.get(server + "/v1/chat/completions")
    assert r.status_code == 405 and r.json()["error"]["type"] == "invalid_request_error"


def test_api_key_on_every_route(pipe: ScriptedPipeline) -> None:
    with background_server(create_app(pipe, ServeArgs(api_key="s3cret", default_max_tokens=2))) as base:
        for method, path in (("GET", "/health"), ("GET", "/v1/models"), ("POST", "/v1/chat/completions")):
            for headers in ({}, {"Authorization": "Bearer wrong"}):
                r = httpx.request(method, base + path, headers=headers, json=valid())
                assert r.status_code == 401, (path, headers)
                assert r.json()["error"]["code"] == "invalid_api_key"
        good = {"Authorization": "Bearer s3cret"}
        assert httpx.get(base + "/health", headers=good).status_code == 200
        assert httpx.post(base + "/v1/chat/completions", json=valid(), headers=good, timeout=TIMEOUT).status_code == 200
        assert httpx.get(base + "/").status_code == 200  # the static page holds no data


def _wait_health(base: str, cond: Any, timeout: float = 30.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        health = httpx.get(base + "/health").json()
        if cond(health):
            return health
        time.sleep(0.05)
    raise AssertionError(f"condition not reached; last /health: {health}")


def test_stream_disconnect_cancels_generation(server: str) -> None:
    before = httpx.get(server + "/health").json()
    body = {"messages": [user("Tell me a long story")], "max_tokens": 900, "stream": True}
    with httpx.stream("POST", server + "/v1/chat/completions", json=body, timeout=TIMEOUT) as r:
        for line in r.iter_lines():  # leave once text arrives: the request is surely generating
            if '"content": "' in line and '"content": ""' not in line:
                break
    health = _wait_health(server, lambda h: h["aborted"] > before["aborted"] and h["running"] == 0)
    assert health["cancelled"] == before["cancelled"] + 1 and health["completed"] == before["completed"]


def test_nonstream_disconnect_cancels_generation(server: str) -> None:
    before = httpx.get(server + "/health").json()
    with pytest.raises(httpx.ReadTimeout):
        post(server, {"messages": [user("Tell me a long story")], "max_tokens": 900},
             timeout=httpx.Timeout(TIMEOUT, read=0.5))
    # dropped from the queue or stopped mid-generation, depending on how far it got in 0.5 s
    health = _wait_health(server, lambda h: h["cancelled"] > before["cancelled"] and h["running"] == 0)
    assert health["completed"] == before["completed"]


def test_full_queue_is_503(pipe: ScriptedPipeline) -> None:
    args = ServeArgs(max_queue=1, max_batch_size=1)
    slow = {"messages": [user("SLOW please")]}
    results: list[int] = []
    threads = [threading.Thread(target=lambda: results.append(post(base, slow).status_code)) for _ in range(2)]
    with background_server(create_app(pipe, args)) as base:
        pipe.gate.clear()  # the first SLOW request holds the engine until the gate opens
        try:
            threads[0].start()
            _wait_health(base, lambda h: h["running"] == 1)
            threads[1].start()
            _wait_health(base, lambda h: h["queued"] == 1)
            r = post(base, slow)
        finally:
            pipe.gate.set()
        assert r.status_code == 503 and r.json()["error"]["code"] == "server_overloaded"
        assert r.headers["retry-after"] == "1"
        for t in threads:
            t.join(TIMEOUT)
        assert results == [200, 200]


# ---- protocol by hand ------------------------------------------------------------------------------
def test_grounding_entries_hand_computed() -> None:
    text = "<|ref|>cat<|/ref|><|det|>[[0, 0, 999, 999], [100, 200, 500, 700]]<|/det|>"
    entries = grounding_entries(text, [(64, 64), (200, 100)])
    assert entries == [
        {"label": "cat", "box": [0, 0, 200, 100], "box_999": [0, 0, 999, 999], "image_index": 1},
        {"label": "cat", "box": [20, 20, 100, 70], "box_999": [100, 200, 500, 700], "image_index": 1},
    ]  # int(100/999*200) = 20, int(200/999*100) = 20, int(500/999*200) = 100, int(700/999*100) = 70
    assert grounding_entries(text, [])[0]["box"] is None
    assert grounding_entries("no boxes here", [(10, 10)]) == []


def test_request_parsing() -> None:
    req = ChatRequest.from_json({"messages": [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "image_url", "image_url": "data:x"},
                                     {"type": "text", "text": "b"}]},
        {"role": "assistant", "content": None}], "max_completion_tokens": 7, "stop": "END", "seed": 3})
    assert [m.role for m in req.messages] == ["system", "user", "assistant"]
    assert req.messages[1].text == "a\nb" and req.messages[1].image_urls == ["data:x"]
    assert (req.max_tokens, req.stop, req.sampling.seed, req.sampling.temperature) == (7, ["END"], 3, 0.0)
    for bad in ({"messages": []}, {"messages": [user("x")], "max_tokens": 1.5},
                {"messages": [user("x")], "stop": ["a", "b", "c", "d", "e"]}, {"messages": [user("x")], "top_p": 0}):
        with pytest.raises(APIError):
            ChatRequest.from_json(bad)
