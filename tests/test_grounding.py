"""Grounding parse / format / draw: good answers, malformed answers, hand-computed pixels."""

import numpy as np
from PIL import Image

from dsvl2.processing.grounding import (
    COLORS,
    Box,
    draw_boxes,
    format_det,
    format_ref_prompt,
    parse_grounding,
    strip_grounding,
)


def test_single_box():
    result = parse_grounding("<|ref|>The giraffe at the back<|/ref|><|det|>[[582, 271, 942, 888]]<|/det|>")
    assert result.boxes == [Box("The giraffe at the back", 582, 271, 942, 888)]
    assert result.errors == []


def test_several_boxes_for_one_expression():
    result = parse_grounding("<|ref|>Watermelon slices<|/ref|><|det|>[[1, 2, 3, 4], [10,20,30,40]]<|/det|>")
    assert result.boxes == [Box("Watermelon slices", 1, 2, 3, 4), Box("Watermelon slices", 10, 20, 30, 40)]
    assert result.errors == []


def test_several_ref_det_pairs_and_grounded_caption():
    text = (
        "In the picture, <|ref|>a cat<|/ref|><|det|>[[10, 20, 300, 400]]<|/det|> sleeps next to "
        "<|ref|>two dogs<|/ref|><|det|>[[500, 100, 700, 300], [710, 90, 990, 310]]<|/det|>."
    )
    result = parse_grounding(text)
    assert [b.label for b in result.boxes] == ["a cat", "two dogs", "two dogs"]
    assert result.boxes[2] == Box("two dogs", 710, 90, 990, 310)
    assert result.errors == []
    assert strip_grounding("<|grounding|>" + text) == "In the picture, a cat sleeps next to two dogs."


def test_odd_number_count_keeps_the_good_box():
    result = parse_grounding("<|ref|>x<|/ref|><|det|>[[1, 2, 3], [4, 5, 6, 7]]<|/det|>")
    assert result.boxes == [Box("x", 4, 5, 6, 7)]
    assert len(result.errors) == 1 and "expected 4 numbers, got 3" in result.errors[0]


def test_unterminated_det_and_list():
    result = parse_grounding("<|ref|>x<|/ref|><|det|>[[1, 2, 3, 4], [5, 6, 7")
    assert result.boxes == [Box("x", 1, 2, 3, 4)]
    assert any("not closed by <|/det|>" in e for e in result.errors)
    assert any("unbalanced brackets" in e for e in result.errors)


def test_nested_lists_and_det_without_ref():
    result = parse_grounding("<|det|>[[[100, 200, 300, 400]]]<|/det|>")
    assert result.boxes == [Box("", 100, 200, 300, 400)]
    mixed = parse_grounding("<|ref|>y<|/ref|><|det|>[[1, 2, [3, 4]]]<|/det|>")
    assert mixed.boxes == [] and len(mixed.errors) == 2  # [3, 4] has 2 numbers; "1, 2" is outside a list


def test_garbage_numbers_out_of_range_and_swapped():
    result = parse_grounding(
        "<|ref|>z<|/ref|><|det|>[[1, 2, x, 4], [1.5, 2, 3, 4], [-5, 10, 1200, 20], [300, 400, 100, 200]]<|/det|>"
    )
    # a non-integer is read as the official parser (Python's eval) reads it
    assert result.boxes == [Box("z", 1.5, 2, 3, 4), Box("z", 0, 10, 999, 20), Box("z", 100, 200, 300, 400)]
    assert len(result.errors) == 4  # 'x', -5 clamped, 1200 clamped, corners swapped
    assert any("'x' is not a number" in e for e in result.errors)
    assert any("value 1200 outside 0-999" in e for e in result.errors)


def test_ref_without_det_and_stray_tags_never_raise():
    result = parse_grounding("<|ref|>lonely<|/ref|> text <|/det|> <|ref|>open")
    assert result.boxes == []
    assert any("'lonely' has no <|det|>" in e for e in result.errors)
    assert any("stray <|/det|>" in e for e in result.errors)
    assert any("not closed by <|/ref|>" in e for e in result.errors)
    assert parse_grounding("").boxes == [] and parse_grounding("plain prose").errors == []
    assert parse_grounding(None).errors  # type: ignore[arg-type]


def test_to_pixels_hand_computed():
    box = Box("g", 582, 271, 942, 888)
    # int(582/999*640)=372, int(271/999*480)=130, int(942/999*640)=603, int(888/999*480)=426
    assert box.to_pixels(640, 480) == (372, 130, 603, 426)
    assert Box("", 0, 0, 999, 999).to_pixels(640, 480) == (0, 0, 640, 480)


def test_format_functions_round_trip():
    assert format_ref_prompt("The red circle") == "<image>\n<|ref|>The red circle<|/ref|>."
    text = format_det("dog", [Box("dog", 1, 2, 3, 4), (5, 6, 7, 8)])
    assert text == "<|ref|>dog<|/ref|><|det|>[[1, 2, 3, 4], [5, 6, 7, 8]]<|/det|>"
    assert parse_grounding(text).boxes == [Box("dog", 1, 2, 3, 4), Box("dog", 5, 6, 7, 8)]


def test_draw_boxes_outlines_and_keeps_size():
    image = Image.new("RGB", (200, 100), (255, 255, 255))
    boxes = [Box("cat", 250, 300, 750, 900), Box("", 0, 0, 999, 999)]
    out = draw_boxes(image, boxes)
    assert out.size == image.size and out is not image
    assert np.asarray(image).min() == 255  # input untouched
    x1, y1, x2, y2 = boxes[0].to_pixels(200, 100)  # (50, 30, 150, 90)
    assert out.getpixel((x1, (y1 + y2) // 2)) == COLORS[0]  # left edge
    assert out.getpixel(((x1 + x2) // 2, y2)) == COLORS[0]  # bottom edge
    assert out.getpixel(((x1 + x2) // 2, (y1 + y2) // 2)) == (255, 255, 255)  # inside unchanged
    assert out.getpixel((0, 50)) == COLORS[1] and out.getpixel((199, 50)) == COLORS[1]  # clipped full box
    label_area = np.asarray(out)[: y1, x1:x2]
    assert (label_area == COLORS[0]).all(axis=-1).any()  # label drawn above the box


def test_non_integer_and_negative_numbers_as_the_official_parser():
    text = "<|ref|>a<|/ref|><|det|>[[162.5, 328, 540.2, 966], [-3, 10, 400, 500], [+7, .5, 8., 9]]<|/det|>"
    result = parse_grounding(text)
    assert result.boxes == [Box("a", 162.5, 328, 540.2, 966), Box("a", 0, 10, 400, 500), Box("a", 7, 0.5, 8.0, 9)]
    assert result.errors == ["det 0 ('a') box 1: value -3 outside 0-999, clamped"]
    # int(162.5 / 999 * 1998) = 325, int(540.2 / 999 * 1998) = int(1080.4) = 1080
    assert result.boxes[0].to_pixels(1998, 999) == (325, 328, 1080, 966)
