"""The demo tasks' generator: seeded determinism, the issue's constraints, and measured pixels."""

import json
import re
from pathlib import Path
from random import Random

import numpy as np
import pytest
from PIL import Image

from dsvl2.demo.tasks import (COLOUR_JITTER, COLOURS, SHAPES, box_to_999, generate, load_words, main,
                              make_charts, make_grounding, make_reading, write_dataset)
from dsvl2.errors import InputError
from dsvl2.processing.grounding import Box, parse_grounding

SHARED = Path(__file__).resolve().parents[2] / "shared"
N = 200
DET = re.compile(r"^<\|ref\|>the (\w+) (\w+)<\|/ref\|><\|det\|>\[\[(\d+), (\d+), (\d+), (\d+)\]\]<\|/det\|>$")


@pytest.fixture(scope="module")
def words() -> list[str]:
    return load_words()


@pytest.fixture(scope="module")
def grounding() -> list:
    rng = Random(7)
    return [make_grounding(rng) for _ in range(N)]


def test_same_seed_same_data_other_seed_other_data(words):
    a, b, c = generate(3, 5), generate(3, 5), generate(3, 6)
    assert [(s.task, s.prompt, s.answer, s.box) for s in a] == [
        (s.task, s.prompt, s.answer, s.box) for s in b]
    assert all(x.image.tobytes() == y.image.tobytes() for x, y in zip(a, b))
    assert [s.answer for s in a] != [s.answer for s in c]
    # each task has its own stream: more samples extend, never reshuffle, the smaller set
    assert [s.answer for s in generate(5, 5, ("charts",))][:3] == [
        s.answer for s in a if s.task == "charts"]


def test_grounding_constraints(grounding):
    for s in grounding:
        w, h = s.image.size
        assert 256 <= w <= 768 and 256 <= h <= 768
        assert all(220 <= c <= 255 for c in s.meta["background"])
        for x in s.meta["shapes"]:  # drawn in one of the colour's shades (plus jitter)
            assert any(max(abs(a - b) for a, b in zip(x["rgb"], shade)) <= COLOUR_JITTER
                       for shade in COLOURS[x["colour"]])
        shapes = s.meta["shapes"]
        assert 1 <= len(shapes) <= 4
        pairs = [(x["colour"], x["shape"]) for x in shapes]
        assert len(set(pairs)) == len(pairs)
        assert all(c in COLOURS and k in SHAPES for c, k in pairs)
        for i, x in enumerate(shapes):
            x1, y1, x2, y2 = x["box"]
            assert 0 <= x1 < x2 < w and 0 <= y1 < y2 < h
            assert 0.15 * min(w, h) <= x2 - x1 <= 0.40 * min(w, h)
            assert 0.15 * min(w, h) <= y2 - y1 <= 0.40 * min(w, h)
            for other in shapes[i + 1:]:
                a1, b1, a2, b2 = other["box"]
                assert x2 < a1 or a2 < x1 or y2 < b1 or b2 < y1, "boxes overlap"
        target = shapes[s.meta["target"]]
        assert s.box == target["box"]
        assert s.prompt == f"<image>\n<|ref|>the {target['colour']} {target['shape']}<|/ref|>."
        m = DET.match(s.answer)
        assert m and m.group(1, 2) == (target["colour"], target["shape"])
        coords = [int(v) for v in m.group(3, 4, 5, 6)]
        assert all(0 <= v <= 999 for v in coords)
        (parsed,) = parse_grounding(s.answer).boxes
        assert [parsed.x1, parsed.y1, parsed.x2, parsed.y2] == coords
        decoded = parsed.to_pixels(w, h)
        assert max(abs(d - t) for d, t in zip(decoded, s.box)) <= 1, (decoded, s.box)


def test_shape_pixels_fill_exactly_their_box(grounding):
    """Measured: each shape's colour lies inside its box and touches all four sides (tight)."""
    for s in grounding[:60]:
        pixels = np.asarray(s.image)
        shapes = s.meta["shapes"]
        for i, x in enumerate(shapes):
            mask = np.all(pixels == np.array(x["rgb"], dtype=np.uint8), axis=-1)
            for j, other in enumerate(shapes):  # a same-RGB shape elsewhere is not this one
                if j != i:
                    a1, b1, a2, b2 = other["box"]
                    mask[b1:b2 + 1, a1:a2 + 1] = False
            ys, xs = np.nonzero(mask)
            assert (xs.min(), ys.min(), xs.max(), ys.max()) == tuple(x["box"]), (x, s.image.size)


def test_coordinates_round_trip_for_every_pixel():
    for side in (200, 256, 257, 333, 511, 512, 640, 767, 768, 998):
        for p in range(side):
            v = box_to_999([p, p, p, p], side, side)[0]
            assert 0 <= v <= 999 and Box("", v, v, v, v).to_pixels(side, side)[0] == p


def test_reading_constraints(words):
    rng = Random(3)
    sizes = set()
    for _ in range(N):
        s = make_reading(rng, words)
        w, h = s.image.size
        assert 200 <= w <= 512 and 200 <= h <= 512
        assert s.answer in words and s.prompt == "<image>\nRead the text in the image."
        assert 28 <= s.meta["font_size"] <= 56
        sizes.add(s.meta["font_size"])
        ink = np.nonzero(np.asarray(s.image.convert("L")) < 128)
        assert ink[0].size > 0, "no text drawn"
        x1, y1, x2, y2 = s.meta["text_box"]
        assert x1 >= 0 and y1 >= 0 and x2 <= w and y2 <= h
        assert x1 <= ink[1].min() and ink[1].max() < x2 and y1 <= ink[0].min() and ink[0].max() < y2
    assert len(sizes) > 15


def test_chart_constraints_and_measured_bar_heights():
    rng = Random(11)
    y_maxes = set()
    for _ in range(N):
        s = make_charts(rng)
        w, h = s.image.size
        assert 256 <= w <= 512 and 256 <= h <= 512
        values, letters = s.meta["values"], s.meta["letters"]
        assert 3 <= len(values) <= 5 and all(1 <= v <= 9 for v in values)
        assert letters == list("ABCDE"[: len(values)])
        asked = s.meta["asked"]
        assert s.prompt == f"<image>\nWhat is the value of bar {letters[asked]}?"
        assert s.answer == str(values[asked])
        pixels = np.asarray(s.image)
        heights = []
        for (x1, y1, x2, y2), v in zip(s.meta["bars"], values):
            column = pixels[:, (x1 + x2) // 2]
            rgb = column[y2]
            assert not np.all(rgb == 255), "bar not drawn"
            same = np.all(column == rgb, axis=-1)
            assert not same[y2 + 1:y2 + 3].any(), "bar runs below the x-axis"
            top = y2
            while same[top - 1]:
                top -= 1
            assert top == y1
            heights.append((y2 + 1 - y1) / v)
        assert max(heights) - min(heights) < 1.0, "bar heights not proportional to values"
        y_maxes.add(s.meta["y_max"])
    assert y_maxes == {9, 10}, "both axis ends an independent generator might draw"


def test_colour_shades_include_pillows_named_colours():
    from PIL import ImageColor

    for name, shades in COLOURS.items():
        assert shades[0] == ImageColor.getrgb(name), name
        assert all(min(rgb) < 220 - 12 for rgb in shades), "a shade could vanish into the background"


def test_write_dataset_rows(tmp_path):
    path = write_dataset(tmp_path, 2, seed=4)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["task"] for r in rows] == ["demo_grounding"] * 2 + ["demo_reading"] * 2 + [
        "demo_charts"] * 2
    assert len({r["id"] for r in rows}) == 6
    for r in rows:
        keys = {"id", "task", "image", "prompt", "answer", "width", "height"}
        assert set(r) == keys | ({"box"} if r["task"] == "demo_grounding" else set())
        with Image.open(tmp_path / r["image"]) as im:
            assert im.size == (r["width"], r["height"])
    conversations = (tmp_path / "conversations.jsonl").read_text().splitlines()
    first = json.loads(conversations[0])["messages"]
    assert first[0]["images"] == [rows[0]["image"]] and first[1]["content"] == rows[0]["answer"]


def test_cli_writes_contact_sheet(tmp_path):
    main(["--out", str(tmp_path), "--n", "2", "--seed", "1", "--tasks", "reading", "charts"])
    with Image.open(tmp_path / "contact_sheet.png") as sheet:
        assert sheet.width > 0
    assert len((tmp_path / "data.jsonl").read_text().splitlines()) == 4


def test_word_list_errors(tmp_path):
    with pytest.raises(InputError, match="nowhere.txt"):
        load_words(tmp_path / "nowhere.txt")
    (tmp_path / "empty.txt").write_text("\n")
    with pytest.raises(InputError, match="empty"):
        load_words(tmp_path / "empty.txt")


def test_shipped_word_list_is_the_shared_one():
    if not SHARED.is_dir():
        pytest.skip("../shared is absent: cannot compare the shipped word list")
    assert load_words() == load_words(SHARED / "demo" / "words.txt")
