"""Grounded conversation (``<|grounding|>``) and in-context visual grounding end to end: an HTTP
request through the engine, the real generation loop (box constraint on, as the server's default) and
back, with the answer's every object in ``message.grounding`` in pixels of the right image.

The micro checkpoint has random weights, so the answer text is teacher-forced through the same
logits-processor hook the box constraint uses (a test processor that allows one token per step):
everything else (prefill, sampling, the constraint's masks, streaming, stop handling, parsing) is
the production path.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

pytest.importorskip("fastapi", reason="needs the serve extra (fastapi)")
from test_server import TIMEOUT, png_data_url, px, scene_image, user  # noqa: E402

import dsvl2  # noqa: E402
from dsvl2.pipeline import Pipeline  # noqa: E402
from dsvl2.serving import ServeArgs  # noqa: E402
from dsvl2.serving.app import background_server, create_app  # noqa: E402

CAPTION = ("A <|ref|>red square<|/ref|><|det|>[[100, 150, 400, 600]]<|/det|> sits left of two "
           "<|ref|>blue circles<|/ref|><|det|>[[500, 100, 700, 300], [710, 90, 990, 310]]<|/det|>.")
IN_CONTEXT = "<|ref|>the square<|/ref|><|det|>[[120, 200, 480, 760]]<|/det|>"


class Forced:
    """Allows exactly the next token of ``ids`` at each step, then EOS."""

    def __init__(self, ids: list[int], eos: int) -> None:
        self.ids, self.eos, self.i = ids + [eos], eos, 0

    def __call__(self, logits: torch.Tensor, remaining: int) -> torch.Tensor:
        out = torch.full_like(logits, float("-inf"))
        out[:, self.ids[min(self.i, len(self.ids) - 1)]] = 0.0
        return out

    def advance(self, tokens: torch.Tensor) -> None:
        self.i += 1


class ForcedPipeline(Pipeline):
    answer = CAPTION
    seen: list[Any] = []

    def processors(self, args, batch_size):  # the constraint runs after the forcing, on every step
        self.seen.append(args.constrain_boxes)
        forced = Forced(self.tokenizer.encode(self.answer), self.tokenizer.eos_id)
        return [forced, *super().processors(args, batch_size)]


@pytest.fixture(scope="module")
def server(golden_dir: Path):
    base = dsvl2.load(golden_dir / "checkpoints" / "micro-mha", dtype="fp32", device="cpu")
    pipe = ForcedPipeline(base.model, base.processor, base.model_dir)
    with background_server(create_app(pipe, ServeArgs(default_max_tokens=80, max_images=4))) as url:
        yield url, pipe


def test_grounded_caption_returns_every_object_with_its_box(server):
    base, pipe = server
    pipe.answer = CAPTION
    size = (480, 320)
    body = {"messages": [user("<|grounding|>Describe the image.", png_data_url(scene_image(size)))], "max_tokens": 80}
    reply = httpx.post(base + "/v1/chat/completions", json=body, timeout=TIMEOUT).json()
    message = reply["choices"][0]["message"]
    assert message["content"] == CAPTION and pipe.seen[-1] is True  # the constraint was on and let it through
    assert [(g["label"], g["box_999"]) for g in message["grounding"]] == [
        ("red square", [100, 150, 400, 600]), ("blue circles", [500, 100, 700, 300]),
        ("blue circles", [710, 90, 990, 310])]
    assert message["grounding"][0]["box"] == px([100, 150, 400, 600], size) == [48, 48, 192, 192]
    assert {g["image_index"] for g in message["grounding"]} == {0}


def test_in_context_grounding_boxes_refer_to_the_second_image(server):
    base, pipe = server
    pipe.answer = IN_CONTEXT
    first, second = (480, 320), (200, 400)
    text = ("<image>\n<image>\n<|grounding|>In the first image, an object within the red rectangle is marked. "
            "Locate the object of the same category in the second image.")
    body = {"messages": [user(text, png_data_url(scene_image(first)), png_data_url(scene_image(second)))],
            "max_tokens": 40, "stream": True}
    with httpx.stream("POST", base + "/v1/chat/completions", json=body, timeout=TIMEOUT) as r:
        events = [line for line in r.iter_lines() if line.startswith("data: {")]
    chunks = [json.loads(e[6:]) for e in events]
    content = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert content == IN_CONTEXT
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    grounding = [d["grounding"] for d in deltas if "grounding" in d]
    assert grounding == [[{"label": "the square", "box": px([120, 200, 480, 760], second),
                           "box_999": [120, 200, 480, 760], "image_index": 1}]]
