"""The context shown: image tokens per image and the context left in ``Completion`` and the server's
``usage``; overflow errors that name the image and its token count; ``truncate="oldest"``; image
token budgets through the pipeline and the server (micro-mha, fp32, CPU)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from dsvl2.errors import ContextLengthError, InputError

pytest.importorskip("fastapi", reason="needs the serve extra (fastapi)")
from test_server import TIMEOUT, load_micro, png_data_url, user  # noqa: E402

from dsvl2.serving import ServeArgs  # noqa: E402
from dsvl2.serving.app import background_server, create_app  # noqa: E402


def noise(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def pipe(golden_dir: Path):
    return load_micro(golden_dir)


def test_completion_reports_image_tokens_and_context_left(pipe):
    done = pipe.complete("What is it?", images=[noise(240, 160)], max_new_tokens=3)
    assert done.image_tokens == [pipe.processor.image_token_count(240, 160)] == [421]  # 240x160 fits one tile
    assert done.context_limit == 4096
    assert done.context_remaining == 4096 - done.prompt_tokens - done.completion_tokens


def test_overflow_names_each_image_and_its_tokens(pipe, tmp_path):
    a, b = tmp_path / "page_a.png", tmp_path / "page_b.png"
    noise(1152, 1152, 1).save(a)
    noise(1152, 1152, 2).save(b)
    question = {"role": "user", "content": "Compare. " + "word " * 80, "images": [a, b]}
    with pytest.raises(ContextLengthError, match=r"over the context limit of 4096 \(image 1 \(.*page_a\.png, "
                                                 r"1152x1152\) takes 2017 tokens; image 2 \(.*page_b\.png, 1152x1152\) "
                                                 r"takes 2017 tokens; the text takes \d+\)"):
        pipe.complete([question], max_new_tokens=2)
    # a budget makes the same conversation fit, and the usage shows where the tokens went
    done = pipe.complete([question], max_new_tokens=2, image_token_budget=3000)
    assert sum(done.image_tokens) <= 3000 and len(done.image_tokens) == 2


def test_truncate_oldest_drops_old_turns_until_it_fits(pipe):
    history = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Describe.", "images": [noise(1152, 1152, 3), noise(1152, 1152, 4)]},
        {"role": "assistant", "content": "Two noisy squares."},
        {"role": "user", "content": "And now? " + "word " * 80},
    ]
    with pytest.raises(ContextLengthError, match="takes 2017 tokens"):
        pipe.complete(history, max_new_tokens=2)
    done = pipe.complete(history, max_new_tokens=2, truncate="oldest")
    assert done.image_tokens == [] and done.prompt_tokens < 200
    conv, batch = pipe.fit(pipe.conversation(history), truncate="oldest")
    assert [m["role"] for m in conv] == ["system", "user"] and conv[1]["content"].startswith("And now?")
    with pytest.raises(InputError, match="truncate must be"):
        pipe.complete(history, truncate="newest")


# ---- server ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(pipe):
    args = ServeArgs(max_images=4, max_image_pixels=2000 * 2000, max_body_bytes=8 * 2**20, max_context=1500,
                     default_max_tokens=3)
    with background_server(create_app(pipe, args)) as base:
        yield base


def post(base: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(base + "/v1/chat/completions", json=body, timeout=TIMEOUT)


def test_server_usage_budget_overflow_and_truncation(server, pipe):
    two = user("Compare.", png_data_url(noise(768, 768, 5)), png_data_url(noise(768, 768, 6)))
    over = post(server, {"messages": [two], "max_tokens": 2})
    assert over.status_code == 400
    error = over.json()["error"]
    assert error["code"] == "context_length_exceeded" and "image 1 (768x768) takes 1023 tokens" in error["message"]
    ok = post(server, {"messages": [two], "max_tokens": 2, "image_token_budget": 900})
    assert ok.status_code == 200, ok.text
    usage = ok.json()["usage"]
    assert usage["image_tokens"] == [421, 421] and usage["context_limit"] == 1500
    assert usage["context_remaining"] == 1500 - usage["prompt_tokens"] - usage["completion_tokens"]
    history = [two, {"role": "assistant", "content": "Noise."}, user("Which is brighter?")]
    cut = post(server, {"messages": history, "max_tokens": 2, "truncate": "oldest"})
    assert cut.status_code == 200 and cut.json()["usage"]["image_tokens"] == []
    bad = post(server, {"messages": [two], "truncate": "middle"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "truncate"
    stream = httpx.post(server + "/v1/chat/completions", timeout=TIMEOUT, json={
        "messages": [two], "max_tokens": 2, "image_token_budget": 900, "stream": True,
        "stream_options": {"include_usage": True}})
    assert '"image_tokens": [421, 421]' in stream.text and '"context_remaining"' in stream.text
