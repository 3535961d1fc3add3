"""The web chat page in headless Chromium (Debian's /usr/bin/chromium driven by Playwright):
upload an image, ask, see the streamed answer; a grounding answer draws its boxes and labels.

``scripts/install-browser.sh`` installs Chromium; without it this module skips, saying so.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from test_server import (
    BOX_A,
    TIMEOUT,
    ScriptedPipeline,
    load_micro,
    png_data_url,
    px,
    scene_image,
    user,
)

CHROMIUM = Path("/usr/bin/chromium")
if not CHROMIUM.exists():
    pytest.skip(f"{CHROMIUM} is absent: run scripts/install-browser.sh (apt-get install chromium)",
                allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="needs the test extra (playwright)")
pytest.importorskip("fastapi", reason="needs the serve extra (fastapi)")

from dsvl2.serving import ServeArgs
from dsvl2.serving.app import background_server, create_app

SIZE = (480, 320)
WAIT_MS = 30_000


@pytest.fixture(scope="module")
def base(golden_dir: Path) -> Iterator[str]:
    pipe: ScriptedPipeline = load_micro(golden_dir)
    with background_server(create_app(pipe, ServeArgs(default_max_tokens=8))) as url:
        yield url


@pytest.fixture(scope="module")
def page(base: str) -> Iterator[object]:
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True,
                                     args=["--headless", "--no-sandbox", "--disable-background-networking"])
        try:
            page = browser.new_page(viewport={"width": 1000, "height": 900})
            page.set_default_timeout(WAIT_MS)
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(base + "/")
            yield page
            assert errors == [], errors
        finally:
            browser.close()


@pytest.fixture(scope="module")
def scene(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("page") / "scene.png"
    scene_image(SIZE).save(path)
    return path


def ask(page: object, text: str, image: Path | None = None) -> object:
    """Type a question (with an upload), send it, wait for the finished answer bubble."""
    done = page.locator(".msg.assistant.done").count()  # type: ignore[attr-defined]
    if image is not None:
        page.set_input_files("#file", str(image))  # type: ignore[attr-defined]
        page.wait_for_selector("#attachments img")  # type: ignore[attr-defined]
    page.fill("#prompt", text)  # type: ignore[attr-defined]
    page.click("#send")  # type: ignore[attr-defined]
    answer = page.locator(".msg.assistant.done").nth(done)  # type: ignore[attr-defined]
    answer.wait_for()
    return answer


def test_upload_ask_and_stream(page: object, scene: Path, base: str) -> None:
    page.wait_for_function("document.getElementById('model').textContent.startsWith('micro-mha')")  # type: ignore
    page.fill("#max-tokens", "8")  # type: ignore[attr-defined]
    answer = ask(page, "What is in the image?", scene)
    from PIL import Image

    expected = httpx.post(base + "/v1/chat/completions", timeout=TIMEOUT, json={
        "messages": [user("What is in the image?", png_data_url(Image.open(scene).convert("RGB")))],
        "max_tokens": 8}).json()["choices"][0]["message"]["content"]
    assert answer.locator(".content").inner_text() == expected  # type: ignore[attr-defined]
    assert "finish:" in answer.locator(".meta").inner_text()  # type: ignore[attr-defined]
    assert page.locator(".msg.user .thumbs img").count() == 1  # type: ignore[attr-defined]


def test_grounding_answer_draws_boxes(page: object, scene: Path, tmp_path: Path) -> None:
    page.check("#grounding-toggle")  # type: ignore[attr-defined]
    answer = ask(page, "Where are the shapes?", scene)
    canvas = answer.locator("canvas.boxes")  # type: ignore[attr-defined]
    canvas.wait_for()
    assert canvas.get_attribute("data-box-count") == "2"
    labels = answer.locator(".ref").all_inner_texts()  # type: ignore[attr-defined]
    assert labels == ["red square", "blue circle"]
    # the red outline sits on the left edge of BOX_A (canvas drawn at the image's own size here)
    x, y1, _, y2 = px(BOX_A, SIZE)
    y = (y1 + y2) // 2
    pixel = canvas.evaluate(f"c => Array.from(c.getContext('2d').getImageData({x}, {y}, 1, 1).data)")
    assert pixel[:3] == [255, 0, 0]
    page.screenshot(path=str(tmp_path / "grounding.png"), full_page=True)  # type: ignore[attr-defined]


def test_budget_bar_shows_image_tokens_and_context_left(page: object, scene: Path, tmp_path: Path) -> None:
    page.click("#new-chat")  # type: ignore[attr-defined]
    page.uncheck("#grounding-toggle")  # type: ignore[attr-defined]
    # 480x320 wants 2x1 (617 tokens); a budget of 500 leaves it 1x1 (421)
    page.fill("#image-budget", "500")  # type: ignore[attr-defined]
    ask(page, "What is in the image?", scene)
    bar = page.locator("#budget")  # type: ignore[attr-defined]
    bar.wait_for()
    label = page.locator("#budget-label").inner_text()  # type: ignore[attr-defined]
    import re

    found = re.fullmatch(r"context (\d+) / 4096 tokens \(images 421\) · (\d+) left", label)
    assert found and int(found[1]) + int(found[2]) == 4096, label
    width = page.evaluate("document.querySelector('#budget .images').style.width")  # type: ignore[attr-defined]
    assert width == f"{100 * 421 / 4096:.2f}%"
    page.screenshot(path=str(tmp_path / "budget.png"), full_page=True)  # type: ignore[attr-defined]
