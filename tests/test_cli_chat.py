"""``dsvl2 chat`` (one-shot, streamed, REPL), ``dsvl2 ground``, ``dsvl2 serve`` flags and the load
progress bar, through the functions ``dsvl2/cli.py`` calls (micro-mha, fp32, CPU)."""

from __future__ import annotations

import argparse
import io
import json
import re
from pathlib import Path
from typing import Any

import pytest
from test_server import BOX_A, ScriptedPipeline, load_micro, px, scene_image

import dsvl2
from dsvl2.cli import chat, ground, loading, serve
from dsvl2.processing.grounding import COLORS
from dsvl2.processing.template import stop_strings
from dsvl2.serving import ServeArgs


@pytest.fixture(scope="module")
def pipe(golden_dir: Path) -> ScriptedPipeline:
    return load_micro(golden_dir)


@pytest.fixture
def cached(pipe: ScriptedPipeline, monkeypatch: pytest.MonkeyPatch) -> ScriptedPipeline:
    """Make the commands reuse the module's pipeline instead of loading it again."""
    monkeypatch.setattr(loading, "load", lambda *a, **k: pipe)
    return pipe


def parse(add: Any, argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add(parser)
    return parser.parse_args(argv)


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "scene.png"
    scene_image((240, 160)).save(path)
    return path


def test_one_shot_chat_loads_and_answers(golden_dir: Path, image: Path, pipe: ScriptedPipeline) -> None:
    model = golden_dir / "checkpoints" / "micro-mha"
    args = parse(chat.add_chat_arguments, ["--model", str(model), "--dtype", "fp32", "--device", "cpu",
                                                "--image", str(image), "--max-new-tokens", "5", "What is it?"])
    out = io.StringIO()
    assert chat.chat_main(args, out=out) == 0
    expected = pipe.chat([{"role": "user", "content": "What is it?", "images": [image]}], max_new_tokens=5,
                         stop=stop_strings(pipe.tokenizer.eos_token), skip_special_tokens=False)
    assert out.getvalue() == expected + "\n"


def test_streamed_chat_prints_the_same(cached: ScriptedPipeline, image: Path) -> None:
    outs = []
    for extra in ([], ["--stream"]):
        out = io.StringIO()
        args = parse(chat.add_chat_arguments, ["--image", str(image), "--max-new-tokens", "5", *extra, "Hi?"])
        assert chat.chat_main(args, out=out) == 0
        outs.append(out.getvalue())
    assert outs[0] == outs[1] and outs[0].strip()


def test_repl_keeps_history_and_commands(cached: ScriptedPipeline, image: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[list[dict[str, Any]]] = []
    real = cached.conversation
    monkeypatch.setattr(cached, "conversation", lambda messages, *a: seen.append(list(messages)) or real(messages, *a))
    lines = [f"/image {image}", "/image /no/such.png", "What is it?", "", "And now?", "/reset", "Hello", "/quit",
             "ignored"]
    stdin = io.StringIO("\n".join(lines) + "\n")
    args = parse(chat.add_chat_arguments, ["--max-new-tokens", "3"])
    out = io.StringIO()
    assert chat.chat_main(args, stdin=stdin, out=out) == 0
    assert [len(m) for m in seen] == [1, 3, 1]  # turn 2 saw turn 1 and its answer; /reset cleared it
    assert seen[0][0]["images"] == [image] and seen[1][2]["images"] == []
    assert seen[1][1]["role"] == "assistant" and seen[1][1]["content"]
    text = out.getvalue()
    assert "attached to the next question" in text and "no such file" in text and "conversation cleared" in text
    # after each turn: the context used (with the image's tokens) and what is left
    used = re.findall(r"\[context: (\d+) of 4096 tokens used( \(images (\d+)\))?, (\d+) left\]", text)
    assert len(used) == 3 and used[0][2] and not used[2][1]
    assert all(int(u) + int(left) == 4096 for u, _, _, left in used)
    assert int(used[1][0]) > int(used[0][0])  # turn 2 carries turn 1 and its answer


def _red_at(path: Path, xy: tuple[int, int]) -> bool:
    from PIL import Image

    return Image.open(path).convert("RGB").getpixel(xy) == COLORS[0]


def test_chat_ground_draws_boxes(cached: ScriptedPipeline, image: Path, tmp_path: Path) -> None:
    target = tmp_path / "out.png"
    args = parse(chat.add_chat_arguments, ["--image", str(image), "--ground", str(target),
                                                "<|ref|>the red square<|/ref|>."])
    out = io.StringIO()
    assert chat.chat_main(args, out=out) == 0
    assert "1 box(es) drawn" in out.getvalue()
    x1, y1, _, y2 = px(BOX_A, (240, 160))
    assert _red_at(target, (x1, (y1 + y2) // 2))  # left edge of the box outline


def test_ground_command(cached: ScriptedPipeline, image: Path, tmp_path: Path) -> None:
    target = tmp_path / "ground.png"
    out = io.StringIO()
    args = parse(ground.add_ground_arguments, ["--image", str(image), "the red square", "-o", str(target)])
    assert ground.ground_main(args, out=out) == 0
    box = px(BOX_A, (240, 160))
    assert out.getvalue().splitlines()[0] == "the red square\t" + " ".join(map(str, box))
    assert _red_at(target, (box[0], (box[1] + box[3]) // 2))
    out = io.StringIO()
    assert ground.ground_main(parse(ground.add_ground_arguments, ["--image", str(image), "--json", "x"]),
                                 out=out) == 0
    assert json.loads(out.getvalue())["boxes"] == [{"label": "x", "box": box, "box_999": BOX_A}]


def test_missing_image_is_a_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    args = parse(ground.add_ground_arguments, ["--image", "/no/such.png", "car"])
    assert ground.ground_main(args) == 2
    assert "image file not found: /no/such.png" in capsys.readouterr().err


def test_load_progress_bar(golden_dir: Path) -> None:
    stream = io.StringIO()
    with loading.load_progress(enabled=True, stream=stream) as progress:
        dsvl2.load(golden_dir / "checkpoints" / "micro-mha", dtype="fp32", device="cpu", progress=progress)
    assert "loading weights" in stream.getvalue()
    with loading.load_progress(stream=io.StringIO()) as progress:  # not a terminal: no bar
        assert progress is None


def test_serve_flags_and_main(monkeypatch: pytest.MonkeyPatch, cached: ScriptedPipeline) -> None:
    pytest.importorskip("uvicorn", reason="needs the serve extra")
    monkeypatch.setenv("DSVL2_API_KEY", "from-env")
    args = parse(serve.add_serve_arguments, ["--port", "9001", "--max-images", "3", "--allow-remote-images",
                                                 "--local-images", "/tmp"])
    assert (args.host, args.port, args.max_images, args.api_key) == ("127.0.0.1", 9001, 3, "from-env")
    assert args.allow_remote_images is True and args.local_images == Path("/tmp")
    ran: dict[str, Any] = {}
    import uvicorn

    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: ran.update(app=app, **kw))
    assert serve.serve_main(args) == 0
    assert (ran["host"], ran["port"]) == ("127.0.0.1", 9001)
    assert ran["app"].state.args == ServeArgs(port=9001, api_key="from-env", max_images=3, allow_remote_images=True,
                                             local_images=Path("/tmp"))


def test_quantize_flag_loads_an_int8_model(golden_dir: Path, image: Path, pipe: ScriptedPipeline,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    from dsvl2.model.quant import Int8Linear

    loaded = []
    real_load = loading.load
    monkeypatch.setattr(loading, "load", lambda *a, **k: loaded.append(real_load(*a, **k)) or loaded[-1])
    model = golden_dir / "checkpoints" / "micro-mha"
    args = parse(chat.add_chat_arguments, ["--model", str(model), "--dtype", "fp32", "--device", "cpu",
                                                "--quantize", "int8", "--image", str(image),
                                                "--max-new-tokens", "3", "What is it?"])
    assert chat.chat_main(args, out=io.StringIO()) == 0
    assert any(isinstance(m, Int8Linear) for m in loaded[0].model.modules())
    with pytest.raises(SystemExit):  # an unknown mode is refused by the parser, naming the choices
        parse(chat.add_chat_arguments, ["--quantize", "int3", "q"])


def test_chat_budget_and_truncate_flags_reach_the_pipeline(cached: ScriptedPipeline, tmp_path: Path) -> None:
    from PIL import Image

    paths = []
    for i, size in enumerate(((800, 600), (800, 600), (1240, 1754))):
        paths.append(tmp_path / f"p{i}.png")
        Image.new("RGB", size, (20 * i, 90, 200)).save(paths[-1])
    argv = ["--max-new-tokens", "3", "--image-token-budget", "2500", "--truncate", "oldest",
            *(x for p in paths for x in ("--image", str(p))), "Compare."]
    args = parse(chat.add_chat_arguments, argv)
    assert args.image_token_budget == 2500 and args.truncate == "oldest"
    out = io.StringIO()
    assert chat.chat_main(args, out=out) == 0
    expected = cached.complete([{"role": "user", "content": "Compare.", "images": paths}], max_new_tokens=3,
                               stop=stop_strings(cached.tokenizer.eos_token), skip_special_tokens=False,
                               image_token_budget=2500)
    assert out.getvalue() == expected.text + "\n"
    assert sum(expected.image_tokens) <= 2500 and expected.image_tokens != [421, 421, 421]
