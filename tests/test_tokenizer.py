"""Tokenizer wrapper and StreamDecoder on the golden checkpoint's real DeepSeek BPE."""

import json
import shutil

import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models, pre_tokenizers

from dsvl2.errors import TokenizerError
from dsvl2.processing.tokenizer import StreamDecoder, Tokenizer


@pytest.fixture(scope="module")
def ckpt(golden_dir):
    return golden_dir / "checkpoints" / "micro-mha"


@pytest.fixture(scope="module")
def tok(ckpt):
    return Tokenizer.from_dir(ckpt)


def test_special_ids_are_read_from_the_files(tok):
    # the ids the golden README lists for this tokenizer
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2)
    assert tok.image_id == 128815
    assert (tok.ref_id, tok.ref_end_id, tok.det_id, tok.det_end_id) == (128816, 128817, 128818, 128819)
    assert (tok.grounding_id, tok.user_id, tok.assistant_id) == (128820, 128821, 128822)
    assert tok.bos_token == "<｜begin▁of▁sentence｜>" and tok.eos_token == "<｜end▁of▁sentence｜>"
    assert tok.vocab_size == 128823


def test_encode_adds_no_special_tokens_and_round_trips(tok):
    ids = tok.encode("Hello world 12345")
    assert tok.bos_id not in ids and tok.eos_id not in ids
    assert tok.decode(ids) == "Hello world 12345"
    assert tok.encode("<|User|>: ")[0] == tok.user_id


def test_encode_matches_transformers_fast_tokenizer(ckpt, tok):
    transformers = pytest.importorskip("transformers")
    ref = transformers.AutoTokenizer.from_pretrained(str(ckpt))
    texts = ["<|User|>: <|ref|>The 2 red circles<|/ref|>.\n\n<|Assistant|>:", "[[582, 271, 942, 888]]", "世界 ꙮ🦜"]
    for text in texts:
        assert tok.encode(text) == ref.encode(text, add_special_tokens=False)


def test_decode_drops_ids_beyond_the_tokenizer(tok):
    ids = tok.encode("abc")
    assert tok.decode(ids + [tok.vocab_size, 129279]) == "abc"
    assert tok.decode([tok.ref_id] + ids, skip_special_tokens=False).startswith("<|ref|>")
    assert tok.decode([tok.bos_id] + ids, skip_special_tokens=True) == "abc"


def test_missing_tokenizer_json_names_the_path(tmp_path):
    with pytest.raises(TokenizerError, match=r"tokenizer\.json"):
        Tokenizer.from_dir(tmp_path)


def test_missing_special_token_is_named(tmp_path):
    names = ["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜▁pad▁｜>", "a"]
    vocab = {t: i for i, t in enumerate(names)}
    hf = HFTokenizer(models.WordLevel(vocab, unk_token="a"))
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    hf.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(TokenizerError, match="<image>"):
        Tokenizer.from_dir(tmp_path)


def test_token_names_come_from_tokenizer_config(ckpt, tmp_path):
    shutil.copy(ckpt / "tokenizer.json", tmp_path / "tokenizer.json")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "<|User|>"}}))
    tok = Tokenizer.from_dir(tmp_path)
    assert tok.eos_token == "<|User|>" and tok.eos_id == 128821
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"pad_token": "<nope>"}))
    with pytest.raises(TokenizerError, match="<nope>"):
        Tokenizer.from_dir(tmp_path)


@pytest.mark.parametrize("text", ["héllo 世界 🙂", "ꙮ𝔘🦜 鷟 ğ 龘靐 <|ref|>x<|/ref|> 🫠🧌 𓀀"])
def test_stream_decoder_concatenates_to_decode(tok, text):
    ids = tok.encode(text) + [tok.vocab_size + 5]  # an id only the model's head has
    decoder = StreamDecoder(tok)
    pieces = [decoder.push(i) for i in ids]
    pieces.append(decoder.flush())
    assert "".join(pieces) == tok.decode(ids) == text
    assert not any("\ufffd" in p for p in pieces)


def test_stream_decoder_holds_back_partial_characters(tok):
    ids = tok.encode("龘")
    assert len(ids) > 1  # this character is split across byte tokens
    decoder = StreamDecoder(tok)
    assert [decoder.push(i) for i in ids[:-1]] == [""] * (len(ids) - 1)
    assert decoder.push(ids[-1]) == "龘"
    assert decoder.flush() == ""
