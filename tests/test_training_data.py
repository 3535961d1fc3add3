"""Training data: row validation with file:line errors, packing, collation and assistant-only labels."""

import json
import random
from pathlib import Path

import pytest
import torch
from PIL import Image
from tokenizers import Tokenizer

from dsvl2.demo.tasks import write_dataset
from dsvl2.errors import InputError
from dsvl2.processing.processor import Processor
from dsvl2.training.data import (IGNORE_INDEX, ConversationDataset, TokenizedSample,
                                 block_causal_mask, collate, concat, load_jsonl, pack,
                                 pack_indices)

EOS = "<｜end▁of▁sentence｜>"


def _user(text: str = "<image>\nWhat is it?", images: list[str] | None = None) -> dict:
    message = {"role": "user", "content": text}
    if images is not None:
        message["images"] = images
    return message


def _answer(text: str = "a cat") -> dict:
    return {"role": "assistant", "content": text}


def _write(tmp_path: Path, lines: list) -> Path:
    (tmp_path / "img").mkdir(exist_ok=True)
    for name in ("a.png", "b.png"):
        Image.new("RGB", (40, 30), (200, 10, 10)).save(tmp_path / "img" / name)
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return path


BAD_ROWS = [  # (row, words the reason must contain); line numbers follow from the order
    ('{"messages": [', "invalid JSON"),
    ({"messages": [_user(images=["img/missing.png"]), _answer()]}, "img/missing.png"),
    ({"messages": [_user(images=["img/a.png", "img/b.png"]), _answer()]}, "1 <image> placeholder(s) but 2"),
    ({"messages": [_user(), _answer()], "images": []}, "1 <image> placeholder(s) but 0"),
    ({"images": ["img/a.png"]}, "missing 'messages'"),
    ({"messages": [_user(images=["img/a.png"]), _answer()], "images": ["img/a.png"]}, "both"),
    ({"messages": [_answer(), _user(images=["img/a.png"])]}, "roles must be"),
    ({"messages": [_user(images=["img/a.png"]), _answer("  ")]}, "empty"),
    ({"messages": [_user(images=["img/a.png"]), _answer()], "imgs": []}, "unknown key"),
    ([1, 2], "JSON object"),
]


def test_bad_rows_are_reported_with_file_and_line(tmp_path):
    good = {"messages": [_user(images=["img/a.png"]), _answer()]}
    path = _write(tmp_path, [good, ""] + [row for row, _ in BAD_ROWS] + [good])
    examples, bad = load_jsonl(path, on_error="skip")
    assert [e.line for e in examples] == [1, len(BAD_ROWS) + 3]  # the blank line 2 is not a row
    assert [b.line for b in bad] == list(range(3, len(BAD_ROWS) + 3))
    for b, (_, words) in zip(bad, BAD_ROWS):
        assert b.file == path and words in b.reason, (b, words)
        assert str(b).startswith(f"{path}:{b.line}: ")
    with pytest.raises(InputError, match=f"{path}:3: invalid JSON"):
        load_jsonl(path)


def test_loader_errors_and_image_assignment(tmp_path):
    with pytest.raises(InputError, match="nowhere.jsonl"):
        load_jsonl(tmp_path / "nowhere.jsonl")
    path = _write(tmp_path, [{"id": "r1", "images": ["img/a.png", "img/b.png"], "messages": [
        {"role": "system", "content": "Be brief."}, _user(), _answer("x"),
        _user("And <image>?"), _answer("y")]}])
    with pytest.raises(InputError, match="on_error"):
        load_jsonl(path, on_error="ignore")
    (example,), bad = load_jsonl(path)
    assert not bad and example.id == "r1" and example.source == f"{path}:1"
    assert [m["images"] for m in example.messages] == [
        [], [str(tmp_path / "img/a.png")], [], [str(tmp_path / "img/b.png")], []]


def _fake(n: int, n_images: int = 0, source: str = "fake") -> TokenizedSample:
    """Ids 1000+i; labels on the first token (BOS, as the processor) and the second half."""
    ids = torch.arange(1000, 1000 + n)
    position = torch.arange(n)
    labels = torch.where((position == 0) | (position >= n // 2), ids, torch.tensor(IGNORE_INDEX))
    tiles = torch.randn(2 * n_images, 3, 8, 8)
    return TokenizedSample(ids, labels, torch.zeros(n, dtype=torch.bool), tiles,
                           torch.ones((n_images, 2), dtype=torch.long), source)


def test_pack_keeps_every_sample_and_respects_max_length():
    rng = random.Random(0)
    for max_length in (16, 100, 1000):
        lengths = [rng.randint(1, max_length) for _ in range(300)]
        rows = pack_indices(lengths, max_length)
        assert sorted(i for row in rows for i in row) == list(range(300))
        assert all(sum(lengths[i] for i in row) <= max_length for row in rows)
        assert all(row == sorted(row) for row in rows)
    with pytest.raises(InputError, match="more than max_length 10"):
        pack([_fake(4), _fake(11, source="big.jsonl:7")], 10)
    with pytest.raises(InputError, match="big.jsonl:7"):
        pack([_fake(11, source="big.jsonl:7")], 10)


def test_packed_rows_and_collated_batch():
    samples = [_fake(5, 1, "s0"), _fake(4, 0, "s1"), _fake(3, 2, "s2"), _fake(8, 0, "s3")]
    rows = pack(samples, 12)
    assert sorted(s for r in rows for s in r.sources) == ["s0", "s1", "s2", "s3"]
    row = next(r for r in rows if r.sources == ("s0", "s1", "s2"))
    assert row.position_ids.tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 3, 0, 1, 2]
    assert row.seq_ids.tolist() == [0] * 5 + [1] * 4 + [2] * 3
    assert row.labels[[0, 5, 9]].tolist() == [IGNORE_INDEX] * 3  # no cross-sample target
    assert torch.equal(row.images, torch.cat([samples[0].images, samples[2].images]))
    assert row.images_spatial_crop.tolist() == [[1, 1]] * 3

    batch = collate(rows + [samples[3]], pad_id=7)
    B, T = batch.input_ids.shape
    assert (B, T) == (len(rows) + 1, 12) and batch.images.shape[1] == 6
    last = batch.input_ids.shape[0] - 1  # the text-only sample: one zero tile, one zero crop row
    assert batch.input_ids[last, 8:].tolist() == [7] * 4
    assert batch.labels[last, 8:].tolist() == [IGNORE_INDEX] * 4
    assert batch.seq_ids[last, 8:].tolist() == [-1] * 4
    assert not batch.attention_mask[last, 8:].any() and batch.attention_mask[last, :8].all()
    assert not batch.images[last].any() and not batch.images_spatial_crop[last].any()
    text_only = collate([samples[1]], pad_id=7)
    assert text_only.images.shape == (1, 1, 3, 8, 8) and text_only.images_spatial_crop.shape == (1, 1, 2)


def test_block_causal_mask_by_hand():
    mask = block_causal_mask(torch.tensor([[0, 0, 1, 1, -1]]))[0, 0].int().tolist()
    assert mask == [[1, 0, 0, 0, 0],
                    [1, 1, 0, 0, 0],
                    [0, 0, 1, 0, 0],
                    [0, 0, 1, 1, 0],
                    [0, 0, 0, 0, 1]]


@pytest.fixture(scope="module")
def micro(golden_dir: Path) -> Path:
    return golden_dir / "checkpoints" / "micro-mha"


@pytest.fixture(scope="module")
def processor(micro: Path) -> Processor:
    return Processor.from_pretrained(micro)


def test_labels_cover_exactly_the_assistant_turns(tmp_path, processor, micro):
    rows = [
        {"messages": [_user(images=["img/a.png"]), _answer("<|ref|>the cat<|/ref|><|det|>[[1, 2, 30, 999]]<|/det|>")]},
        {"messages": [{"role": "system", "content": "You are terse."}, _user("Hi there"),
                      _answer(" hello "), _user("<image> and <image>", ["img/a.png", "img/b.png"]),
                      _answer("two red boxes")]},
    ]
    examples, _ = load_jsonl(_write(tmp_path, rows))
    dataset = ConversationDataset(examples, processor)
    samples = [dataset[i] for i in range(len(dataset))]
    assert samples[1].images_spatial_crop.shape == (2, 2) and samples[1].images.shape[0] == 4
    (row,) = pack(samples, sum(len(s) for s in samples))
    tokenizer = Tokenizer.from_file(str(micro / "tokenizer.json"))
    keep = row.labels != IGNORE_INDEX
    assert torch.equal(row.labels[keep], row.input_ids[keep])
    assert not (keep & row.images_seq_mask).any()
    for i, s in enumerate(rows):
        answers = [m["content"].strip() + EOS for m in s["messages"] if m["role"] == "assistant"]
        ids = row.labels[keep & (row.seq_ids == i)].tolist()
        assert tokenizer.decode(ids, skip_special_tokens=False) == "".join(answers)


def test_demo_conversations_load_and_unreadable_image_names_the_row(tmp_path, processor):
    write_dataset(tmp_path, 1, seed=2)
    examples, bad = load_jsonl(tmp_path / "conversations.jsonl")
    assert len(examples) == 3 and not bad
    sample = ConversationDataset(examples, processor)[1]
    assert sample.images_seq_mask.sum() > 0 and (sample.labels != IGNORE_INDEX).any()
    (tmp_path / examples[0].messages[0]["images"][0]).write_bytes(b"not a png")
    with pytest.raises(InputError, match="conversations.jsonl:1: cannot read image"):
        ConversationDataset(examples, processor)[0]
