"""The real ``openai`` client against a live server on 127.0.0.1 (micro-mha, fp32, CPU).

Non-streaming and streaming answers equal the pipeline's own greedy answer, images travel as data
URLs, grounded answers carry pixel boxes in ``message.grounding``, errors surface as the client's
exception types, and 16 concurrent requests are batched with results equal to sequential ones.
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

openai = pytest.importorskip("openai", reason="needs the test extra (openai)")
pytest.importorskip("fastapi", reason="needs the serve extra (fastapi)")

from test_server import (
    BOX_A,
    BOX_B,
    TIMEOUT,
    ScriptedPipeline,
    load_micro,
    png_data_url,
    px,
    scene_image,
    user,
)

from dsvl2.processing.template import stop_strings
from dsvl2.serving import ServeArgs
from dsvl2.serving.app import background_server, create_app

KEY = "test-key"
MODEL = "micro-mha"


@pytest.fixture(scope="module")
def pipe(golden_dir: Path) -> ScriptedPipeline:
    return load_micro(golden_dir)


@pytest.fixture(scope="module")
def base(pipe: ScriptedPipeline) -> Iterator[str]:
    args = ServeArgs(api_key=KEY, max_batch_size=16, max_images=4, default_max_tokens=6)
    with background_server(create_app(pipe, args)) as url:
        yield url


@pytest.fixture(scope="module")
def client(base: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=base + "/v1", api_key=KEY, max_retries=0, timeout=TIMEOUT)


def direct(pipe: ScriptedPipeline, text: str, images: list[Image.Image], max_tokens: int) -> str:
    """The pipeline's own greedy answer, with the server's settings (tags kept, template stops)."""
    messages = [{"role": "user", "content": text, "images": images}]
    return pipe.chat(messages, stop=stop_strings(pipe.tokenizer.eos_token), skip_special_tokens=False,
                     max_new_tokens=max_tokens)


def test_models(client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list()] == [MODEL]


def test_nonstreaming_with_image_equals_pipeline(client: openai.OpenAI, pipe: ScriptedPipeline) -> None:
    image = Image.new("RGB", (40, 30), (20, 160, 60))
    r = client.chat.completions.create(model=MODEL, messages=[user("What is in the image?", png_data_url(image))],
                                       max_tokens=5)
    assert r.choices[0].message.content == direct(pipe, "What is in the image?", [image], 5)
    assert r.choices[0].finish_reason in ("stop", "length")
    assert 0 < r.usage.completion_tokens <= 5 and r.usage.prompt_tokens > 100  # the image's tokens count


def test_streaming_equals_nonstreaming(client: openai.OpenAI) -> None:
    messages = [user("Describe it.", png_data_url((24, 40), (10, 10, 200)))]
    full = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, seed=1)
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == full.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == full.usage.total_tokens


def test_multi_turn_with_two_images(client: openai.OpenAI) -> None:
    messages = [
        {"role": "system", "content": "You are terse."},
        user("What colour?", png_data_url((30, 30), (255, 0, 0))),
        {"role": "assistant", "content": "Red."},
        user("And this one?", png_data_url((30, 30), (0, 0, 255))),
    ]
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=3, temperature=0.8, top_p=0.9,
                                       seed=7, stop=["\n\n"])
    again = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=3, temperature=0.8, top_p=0.9,
                                           seed=7, stop=["\n\n"])
    assert r.choices[0].message.content == again.choices[0].message.content  # same seed, same tokens
    assert r.usage.prompt_tokens > 2 * 100


def test_grounding_boxes(client: openai.OpenAI) -> None:
    image = scene_image((480, 320))
    r = client.chat.completions.create(model=MODEL, messages=[user("<|ref|>the red square<|/ref|>.",
                                                                   png_data_url(image))])
    message = r.choices[0].message
    assert message.content == f"<|ref|>the red square<|/ref|><|det|>[{BOX_A}]<|/det|>"
    assert message.grounding == [  # type: ignore[attr-defined]  (extension field)
        {"label": "the red square", "box_999": BOX_A, "image_index": 0, "box": px(BOX_A, (480, 320))}]


def test_grounding_boxes_streamed_refer_to_last_image(client: openai.OpenAI) -> None:
    messages = [user("<|grounding|>Describe the scene.", png_data_url((50, 50)), png_data_url(scene_image((300, 200))))]
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, stream=True))
    final = next(c for c in chunks if c.choices and c.choices[0].finish_reason)
    grounding: list[dict[str, Any]] = final.choices[0].delta.grounding  # type: ignore[attr-defined]
    assert [(g["label"], g["box_999"], g["image_index"]) for g in grounding] == [
        ("red square", BOX_A, 1), ("blue circle", BOX_B, 1)]
    assert grounding[1]["box"] == px(BOX_B, (300, 200)) == [180, 60, 270, 160]


def test_errors_surface_as_client_exceptions(client: openai.OpenAI, base: str) -> None:
    cases = [
        (openai.NotFoundError, {"model": "gpt-4o", "messages": [user("hi")]}),
        (openai.BadRequestError, {"model": MODEL, "messages": [user("x", "data:image/png;base64,!!!")]}),
        (openai.BadRequestError, {"model": MODEL, "messages": [user("x", png_data_url())] * 5}),
        (openai.BadRequestError, {"model": MODEL, "messages": [user("hi")], "max_tokens": 100_000}),
        (openai.UnprocessableEntityError, {"model": MODEL, "messages": [{"role": "user", "content": 5}]}),
    ]
    for kind, kwargs in cases:
        with pytest.raises(kind) as info:
            client.chat.completions.create(**kwargs)
        assert info.value.body["code"], info.value.body  # the OpenAI error object reached the client
    wrong = openai.OpenAI(base_url=base + "/v1", api_key="wrong", max_retries=0, timeout=TIMEOUT)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()
    with pytest.raises(openai.AuthenticationError):
        wrong.chat.completions.create(model=MODEL, messages=[user("hi")], stream=True)
    assert client.chat.completions.create(model=MODEL, messages=[user("hi")], max_tokens=2).choices


def test_16_concurrent_requests_equal_sequential(client: openai.OpenAI, base: str) -> None:
    prompts = [(f"Question number {i}?", [png_data_url((20 + 8 * i, 24), (30 * i, 80, 200))] if i % 2 else [])
               for i in range(8)]

    def ask(k: int) -> str:
        text, urls = prompts[k % 8]
        r = client.chat.completions.create(model=MODEL, messages=[user(text, *urls)], max_tokens=6)
        return r.choices[0].message.content or ""

    sequential = [ask(k) for k in range(8)]
    def health() -> dict[str, Any]:
        return httpx.get(base + "/health", headers={"Authorization": f"Bearer {KEY}"}).json()

    before = health()
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        concurrent_answers = list(pool.map(ask, range(16)))
    after = health()
    assert concurrent_answers == sequential * 2
    assert after["completed"] - before["completed"] == 16
    assert after["max_batch_seen"] > 1  # the requests really were batched
