"""Tiling against hand-computed cases (spec 5.3-5.6) and Pillow's own ImageOps.pad."""

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from dsvl2.processing.processor import DEFAULT_CANDIDATE_RESOLUTIONS as CANDIDATES
from dsvl2.processing.tiling import contain_size, normalize, pad_to, select_best_resolution, tile_image

GREY = (127, 127, 127)


def noise(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.mark.parametrize(
    ("size", "best"),
    [
        ((800, 600), (1152, 768)),
        ((640, 480), (768, 768)),
        ((1920, 1080), (1536, 768)),
        ((1024, 1024), (1152, 1152)),
        ((384, 384), (384, 384)),
        ((100, 100), (384, 384)),
        ((500, 2000), (384, 1536)),
        ((3000, 400), (3072, 384)),
    ],
)
def test_select_best_resolution_spec_examples(size, best):
    assert select_best_resolution(size, CANDIDATES) == best


def test_select_best_resolution_ties_go_to_the_earliest_candidate():
    # a small square fits both wholly; same effective area, same waste -> list order decides
    assert select_best_resolution((100, 100), [(768, 384), (384, 768)]) == (768, 384)
    assert select_best_resolution((100, 100), [(384, 768), (768, 384)]) == (384, 768)


def test_contain_uses_bankers_rounding():
    assert contain_size((768, 5), (384, 384)) == (384, 2)  # 2.5 -> 2, not 3
    assert contain_size((768, 7), (384, 384)) == (384, 4)  # 3.5 -> 4
    assert contain_size((800, 600), (384, 384)) == (384, 288)
    assert contain_size((800, 600), (1152, 768)) == (1024, 768)


def test_pad_offset_uses_bankers_rounding_and_grey_127():
    strip = Image.new("RGB", (384, 3), (255, 0, 0))  # free space 381 -> offset round(190.5) = 190
    out = np.asarray(pad_to(strip, (384, 384)))
    rows = np.flatnonzero((out != GREY).any(axis=(1, 2)))
    assert rows.tolist() == [190, 191, 192]
    assert (out[:190] == 127).all() and (out[193:] == 127).all()


def test_worked_example_800x600():
    image = Image.new("RGB", (800, 600), (0, 0, 255))
    tiles, nw, nh = tile_image(image, CANDIDATES, 384, cropping=True)
    assert (nw, nh) == (3, 2) and len(tiles) == 7
    assert all(t.size == (384, 384) for t in tiles)
    glob = np.asarray(tiles[0])
    assert (glob[:48] == 127).all() and (glob[48:336] == (0, 0, 255)).all() and (glob[336:] == 127).all()
    first = np.asarray(tiles[1])  # local canvas 1152x768 with the 1024x768 image at x = 64
    assert (first[:, :64] == 127).all() and (first[:, 64:] == (0, 0, 255)).all()
    last = np.asarray(tiles[3])  # row 0, third tile: x 768..1152, image ends at 1088
    assert (last[:, : 1088 - 768] == (0, 0, 255)).all() and (last[:, 1088 - 768 :] == 127).all()


@pytest.mark.parametrize(("width", "height"), [(800, 600), (37, 91), (1600, 200), (300, 1400), (384, 3)])
def test_pad_to_equals_pillow_imageops_pad(width, height):
    image = noise(width, height, seed=width)
    best = select_best_resolution((width, height), CANDIDATES)
    for target in [(384, 384), best]:
        expected = ImageOps.pad(image, target, method=Image.Resampling.BICUBIC, color=GREY, centering=(0.5, 0.5))
        assert np.array_equal(np.asarray(pad_to(image, target)), np.asarray(expected))


def test_tiles_are_row_major_crops_of_the_local_canvas():
    image = noise(640, 480, seed=1)
    tiles, nw, nh = tile_image(image, CANDIDATES, 384, cropping=True)
    canvas = np.asarray(pad_to(image, (768, 768)))
    assert (nw, nh) == (2, 2)
    assert np.array_equal(np.asarray(tiles[0]), np.asarray(pad_to(image, (384, 384))))
    for k, (y, x) in enumerate([(0, 0), (0, 384), (384, 0), (384, 384)]):
        assert np.array_equal(np.asarray(tiles[1 + k]), canvas[y : y + 384, x : x + 384])


def test_no_cropping_gives_one_local_tile_equal_to_the_global_view():
    tiles, nw, nh = tile_image(noise(800, 600), CANDIDATES, 384, cropping=False)
    assert (nw, nh) == (1, 1) and len(tiles) == 2
    assert np.array_equal(np.asarray(tiles[0]), np.asarray(tiles[1]))


def test_smaller_tile_size_comes_from_the_argument():
    candidates = [(224, 224), (224, 448), (448, 224), (448, 448)]
    tiles, nw, nh = tile_image(noise(600, 200), candidates, 224, cropping=True)
    assert (nw, nh) == (2, 1)
    assert [t.size for t in tiles] == [(224, 224)] * 3


def test_normalize_values_and_layout():
    tile = Image.fromarray(np.array([[[0, 127, 255], [255, 0, 0]]], dtype=np.uint8))  # 1x2 RGB
    x = normalize([tile, tile])
    assert x.dtype == torch.float32 and x.shape == (2, 3, 1, 2)
    assert x[0, :, 0, 0].tolist() == [-1.0, (torch.tensor(127.0) / 255 - 0.5).div(0.5).item(), 1.0]
    assert x[0, :, 0, 1].tolist() == [1.0, -1.0, -1.0]
    raw = normalize([tile], None, None)
    assert raw[0, 2, 0, 0].item() == 1.0 and raw[0, 0, 0, 0].item() == 0.0


def test_extremely_elongated_image_is_a_clear_error():
    from PIL import Image

    from dsvl2.errors import InputError
    from dsvl2.processing.tiling import pad_to

    with pytest.raises(InputError, match="4000x2 pixels is too elongated"):
        pad_to(Image.new("RGB", (4000, 2)), (384, 384))
