"""Processor behaviour: batching, labels, tiling switch, config, and bad input."""

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from dsvl2.errors import ConfigError, InputError, TokenizerError
from dsvl2.processing.layout import num_image_tokens
from dsvl2.processing.processor import Processor, ProcessorConfig


@pytest.fixture(scope="module")
def ckpt(golden_dir):
    return golden_dir / "checkpoints" / "micro-mha"


@pytest.fixture(scope="module")
def proc(ckpt):
    return Processor.from_pretrained(ckpt)


def picture(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def user(text: str, *images) -> dict:
    return {"role": "<|User|>", "content": text, "images": list(images)}


def test_config_from_golden_file(proc, ckpt):
    cfg = ProcessorConfig.from_json(ckpt / "processor_config.json")
    assert cfg.image_size == 384 and len(cfg.candidate_resolutions) == 23
    assert cfg.candidate_resolutions[-1] == (1152, 1152)
    assert cfg.mask_prompt is False and cfg.ignore_id == -100
    assert proc.pad_color == (127, 127, 127) and proc.grid == 14


def test_image_token_count(proc):
    assert proc.image_token_count(800, 600) == 1415
    assert proc.image_token_count(800, 600, n_images_in_conversation=2) == 1415
    assert proc.image_token_count(800, 600, n_images_in_conversation=3) == 421


def test_inference_appends_the_assistant_turn_and_drops_eos(proc):
    tok = proc.tokenizer
    implicit = proc([user("Hello there.")])
    explicit = proc([user("Hello there."), {"role": "<|Assistant|>", "content": ""}])
    assert torch.equal(implicit.input_ids, explicit.input_ids)
    expected = [tok.bos_id] + tok.encode("<|User|>: Hello there.\n\n<|Assistant|>:")
    assert implicit.input_ids[0].tolist() == expected
    assert implicit.sft_format == ["<|User|>: Hello there.\n\n<|Assistant|>:"]


def test_role_spellings_and_system_prompt(proc):
    a = proc([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}, user("Again")])
    b = proc([user("Hi"), {"role": "<|Assistant|>", "content": "Yo"}, user("Again")], system_prompt="Be brief.")
    assert torch.equal(a.input_ids, b.input_ids)  # system_prompt only reaches the display string
    assert b.sft_format[0].startswith("Be brief.\n\n<|User|>: Hi\n\n<|Assistant|>: Yo<｜end▁of▁sentence｜>")
    with pytest.raises(InputError, match="unknown message role 'bot'"):
        proc([{"role": "bot", "content": "x"}])


def test_labels_on_a_two_turn_conversation(proc):
    tok = proc.tokenizer
    conv = [
        user("<image>\nWhat?", picture(40, 30)),
        {"role": "assistant", "content": "A dot."},
        user("Sure?"),
        {"role": "assistant", "content": "Yes."},
    ]
    batch = proc(conv, inference=False, mask_prompt=True)
    turn1 = tok.encode("<|User|>: ") + [tok.image_id] * 421 + tok.encode("\nWhat?\n\n<|Assistant|>:")
    turn2 = tok.encode("<|User|>: Sure?\n\n<|Assistant|>:")
    ans1, ans2 = tok.encode("A dot.") + [tok.eos_id], tok.encode("Yes.") + [tok.eos_id]
    assert batch.input_ids[0].tolist() == [tok.bos_id] + turn1 + ans1 + turn2 + ans2  # EOS kept when training
    assert batch.labels[0].tolist() == [tok.bos_id] + [-100] * len(turn1) + ans1 + [-100] * len(turn2) + ans2
    unmasked = proc(conv, inference=False, mask_prompt=False).labels[0]
    ids = batch.input_ids[0]
    assert torch.equal(unmasked, torch.where(ids == tok.image_id, -100, ids))  # image positions never trained
    # default mask_prompt comes from the config (false in the golden checkpoints)
    assert torch.equal(proc(conv, inference=False).labels, unmasked[None])


def test_batch_is_left_padded_and_rows_equal_single(proc):
    conv_a = [user("<image>\nDescribe.", picture(800, 600, 1))]
    conv_b = [user("Just text, a bit longer than the other prompt, to vary lengths.")]
    conv_c = [user("<image>\n<image>\nCompare.", picture(100, 100, 2), picture(1600, 200, 3))]
    batch = proc([conv_a, conv_b, conv_c], inference=False)
    assert len(batch) == 3 and batch.images_seq_mask.dtype == torch.bool
    assert batch.images.shape[:2] == (3, 8)  # conv_c: 2 + (1 + 5x1) and batch.images_spatial_crop.shape == (3, 2, 2)
    for b, conv in enumerate([conv_a, conv_b, conv_c]):
        one = proc(conv, inference=False)
        n, T = one.input_ids.shape[1], batch.input_ids.shape[1]
        keep = batch.attention_mask[b]
        assert keep.sum() == n and not keep[: T - n].any()
        assert (batch.input_ids[b, : T - n] == proc.tokenizer.pad_id).all()
        assert (batch.labels[b, : T - n] == -100).all()
        for key in ("input_ids", "images_seq_mask", "labels"):
            assert torch.equal(getattr(batch, key)[b, keep], getattr(one, key)[0]), key
        tiles = one.images.shape[1]
        assert torch.equal(batch.images[b, :tiles], one.images[0]) and not batch.images[b, tiles:].any()
        crops = one.images_spatial_crop.shape[1]
        assert torch.equal(batch.images_spatial_crop[b, :crops], one.images_spatial_crop[0])
        assert not batch.images_spatial_crop[b, crops:].any()
        assert batch.num_image_tokens[b] == one.num_image_tokens[0]
    assert batch.images_spatial_crop[1].tolist() == [[0, 0], [0, 0]]  # text-only row


def test_more_than_two_images_switch_tiling_off(proc):
    two = proc([user("<image><image>", picture(800, 600), picture(800, 600, 1))])
    assert two.images_spatial_crop[0].tolist() == [[3, 2], [3, 2]] and two.num_image_tokens == [[1415, 1415]]
    # the count is over the whole conversation, not per turn
    conv = [user("<image>"), {"role": "assistant", "content": "ok"}, user("<image><image>")]
    three = proc(conv, images=[picture(800, 600), picture(800, 600, 1), picture(800, 600, 2)])
    assert three.images_spatial_crop[0].tolist() == [[1, 1]] * 3
    assert three.num_image_tokens == [[421] * 3] and three.images.shape[1] == 6
    assert int(three.images_seq_mask.sum()) == 3 * 421


def test_text_only_gives_one_zero_tile(proc):
    batch = proc([user("No picture.")])
    assert batch.images.shape == (1, 1, 3, 384, 384) and not batch.images.any()
    assert batch.images_spatial_crop.tolist() == [[[0, 0]]] and batch.num_image_tokens == [[]]


def test_images_argument_equals_per_message_images(proc):
    image = picture(300, 500)
    a = proc([user("<image>\nWhat?", image)])
    b = proc([user("<image>\nWhat?")], images=[image])
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.images, b.images)


def test_smaller_tile_size_from_config(proc):
    cfg = ProcessorConfig(candidate_resolutions=((224, 224), (224, 448), (448, 224), (448, 448)))
    small = Processor(proc.tokenizer, cfg)
    assert cfg.image_size == 224 and small.grid == 8
    batch = small([user("<image>", picture(448, 448))])
    assert batch.images.shape == (1, 5, 3, 224, 224)
    assert batch.num_image_tokens == [[num_image_tokens(2, 2, 8)]] == [[345]]
    assert small.image_token_count(448, 448) == 345


def test_batch_to_casts_images_only(proc):
    batch = proc([user("<image>", picture(50, 50))], inference=False).to("cpu", dtype=torch.bfloat16)
    assert batch.images.dtype == torch.bfloat16 and batch.input_ids.dtype == torch.long
    assert batch.labels.dtype == torch.long and batch.images_seq_mask.dtype == torch.bool


# ---- bad input -------------------------------------------------------------------------------


def test_image_count_mismatch(proc):
    with pytest.raises(InputError, match="2 <image> placeholders but 1 images"):
        proc([user("<image><image>", picture(10, 10))])
    with pytest.raises(InputError, match="conversation 1: the text has 0 <image> placeholders but 1"):
        proc([[user("fine")], [user("no tag", picture(10, 10))]])


def test_over_long_prompt(proc):
    with pytest.raises(InputError, match=r"prompt is \d+ tokens, longer than max_length 5"):
        proc([user("This prompt is certainly longer than five tokens.")], max_length=5)


def test_zero_size_image(proc, tmp_path):
    with pytest.raises(InputError, match="zero size"):
        proc([user("<image>", Image.new("RGB", (0, 0)))])
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(InputError, match="empty.png"):
        proc([user("<image>", empty)])


def test_truncated_png(proc, tmp_path):
    buf = io.BytesIO()
    picture(64, 64).save(buf, format="PNG")
    path = tmp_path / "cut.png"
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(InputError, match="cut.png"):
        proc([user("<image>", path)])


def test_missing_image_file(proc, tmp_path):
    with pytest.raises(InputError, match="not found.*nowhere.jpg"):
        proc([user("<image>", tmp_path / "nowhere.jpg")])


def test_missing_tokenizer_json(tmp_path):
    with pytest.raises(TokenizerError, match=r"tokenizer\.json"):
        Processor.from_pretrained(tmp_path)


def test_unknown_processor_config_key(ckpt, tmp_path):
    data = json.loads((ckpt / "processor_config.json").read_text())
    data["image_sizee"] = 384
    path = tmp_path / "processor_config.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match=r"unknown key 'image_sizee'.*processor_config\.json"):
        ProcessorConfig.from_json(path)


def test_bad_candidate_resolution(tmp_path):
    with pytest.raises(ConfigError, match=r"\[500, 384\]"):
        ProcessorConfig(candidate_resolutions=((384, 384), (500, 384)))
