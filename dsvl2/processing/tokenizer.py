"""The DeepSeek byte-level BPE tokenizer, read from a checkpoint's ``tokenizer.json``.

The official processor (``deepseek_vl2/models/processing_deepseek_vl_v2.py``) wraps a
``LlamaTokenizerFast`` built from the same file and always encodes with
``add_special_tokens=False``; decoding uses ``skip_special_tokens=False`` so grounding tags
survive (spec sections 6.1 and 8.4). We call the ``tokenizers`` library directly: its
pre-tokenisation (digit splitting, CJK runs) must not be re-implemented.

Every special-token id is read from the files by token text, never hard-coded: the Small model's
tokenizer puts them near 100000, Tiny/Base near 128815 (spec P12).

:class:`StreamDecoder` turns a stream of ids into text pieces without ever emitting half of a
multi-byte UTF-8 character (the incremental scheme of vLLM's ``detokenize_incrementally``).
"""

import json
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as _HFTokenizer

from dsvl2.errors import TokenizerError

BOS_TOKEN = "<｜begin▁of▁sentence｜>"
EOS_TOKEN = "<｜end▁of▁sentence｜>"
PAD_TOKEN = "<｜▁pad▁｜>"
IMAGE_TOKEN = "<image>"

# attribute name -> token text of the VL2 special tokens the processor and parser need
SPECIAL_TOKENS = {
    "image_id": IMAGE_TOKEN,
    "ref_id": "<|ref|>",
    "ref_end_id": "<|/ref|>",
    "det_id": "<|det|>",
    "det_end_id": "<|/det|>",
    "grounding_id": "<|grounding|>",
    "user_id": "<|User|>",
    "assistant_id": "<|Assistant|>",
}


def _token_text(value: Any) -> str | None:
    """A special token as written in tokenizer_config.json: a string or ``{"content": ...}``."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise TokenizerError(f"cannot read {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise TokenizerError(f"{path} must hold a JSON object")
    return data


class Tokenizer:
    """Encode / decode text with the checkpoint's tokenizer and expose the special-token ids."""

    def __init__(
        self,
        tokenizer: _HFTokenizer,
        bos_token: str = BOS_TOKEN,
        eos_token: str = EOS_TOKEN,
        pad_token: str = PAD_TOKEN,
        source: str = "tokenizer",
    ) -> None:
        self._tok = tokenizer
        self.source = source
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.pad_token = pad_token
        self.vocab_size: int = tokenizer.get_vocab_size(with_added_tokens=True)
        self.bos_id = self.token_id(bos_token)
        self.eos_id = self.token_id(eos_token)
        self.pad_id = self.token_id(pad_token)
        self.image_id = self.token_id(SPECIAL_TOKENS["image_id"])
        self.ref_id = self.token_id(SPECIAL_TOKENS["ref_id"])
        self.ref_end_id = self.token_id(SPECIAL_TOKENS["ref_end_id"])
        self.det_id = self.token_id(SPECIAL_TOKENS["det_id"])
        self.det_end_id = self.token_id(SPECIAL_TOKENS["det_end_id"])
        self.grounding_id = self.token_id(SPECIAL_TOKENS["grounding_id"])
        # Role tokens: DeepSeek-OCR tokenizers have none (their plain prompts carry no roles) -> None.
        self.user_id: int | None = self.find_token(SPECIAL_TOKENS["user_id"])
        self.assistant_id: int | None = self.find_token(SPECIAL_TOKENS["assistant_id"])

    @classmethod
    def from_file(cls, path: str | Path, **special: str) -> "Tokenizer":
        """Load a ``tokenizer.json``; ``special`` overrides ``bos_token`` / ``eos_token`` / ``pad_token``."""
        path = Path(path)
        if not path.is_file():
            raise TokenizerError(f"tokenizer file not found: {path}")
        try:
            tok = _HFTokenizer.from_file(str(path))
        except Exception as exc:  # the Rust side raises plain Exception subclasses
            raise TokenizerError(f"cannot load tokenizer {path}: {exc}") from exc
        return cls(tok, source=str(path), **special)

    @classmethod
    def from_dir(cls, model_dir: str | Path, default_pad_token: str = PAD_TOKEN) -> "Tokenizer":
        """Load ``<model_dir>/tokenizer.json``; bos/eos/pad names come from
        ``tokenizer_config.json`` or ``special_tokens_map.json`` when present. As the official
        processor, ``default_pad_token`` (the processor config's) is used only when neither file
        names a pad token."""
        model_dir = Path(model_dir)
        names: dict[str, str] = {"pad_token": default_pad_token}
        for filename in ("special_tokens_map.json", "tokenizer_config.json"):  # later wins
            path = model_dir / filename
            if not path.is_file():
                continue
            data = _read_json(path)
            for key in ("bos_token", "eos_token", "pad_token"):
                text = _token_text(data.get(key))
                if text:
                    names[key] = text
        return cls.from_file(model_dir / "tokenizer.json", **names)

    def token_id(self, token: str) -> int:
        """Id of ``token`` in this tokenizer; a missing token raises :class:`TokenizerError`."""
        idx = self._tok.token_to_id(token)
        if idx is None:
            raise TokenizerError(f"special token {token!r} is missing from {self.source}")
        return idx

    def find_token(self, token: str) -> int | None:
        """Id of ``token``, or None when this tokenizer has no such token."""
        return self._tok.token_to_id(token)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` with no BOS/EOS added (``add_special_tokens=False``)."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        """Text of ``ids``; ids outside the tokenizer (the model's vocabulary has extra rows)
        are dropped instead of failing."""
        valid = [int(i) for i in ids if 0 <= int(i) < self.vocab_size]
        return self._tok.decode(valid, skip_special_tokens=skip_special_tokens)

    def token_texts(self) -> list[str]:
        """The text each id writes on its own (special tokens as their tag; a piece of a multi-byte
        character as U+FFFD), for constrained decoding."""
        return self._tok.decode_batch([[i] for i in range(self.vocab_size)], skip_special_tokens=False)

    def __len__(self) -> int:
        return self.vocab_size


class StreamDecoder:
    """Incremental detokenizer: ``push`` one id at a time, get back the newly printable text.

    Keeps a window ``ids[prefix:]`` and compares its decode with that of ``ids[prefix:read]``;
    text is released only when the decode does not end in U+FFFD, i.e. when no multi-byte
    character is still waiting for its remaining bytes. The concatenation of every ``push`` and
    the final ``flush`` equals ``tokenizer.decode(all_ids)``.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._ids: list[int] = []
        self._prefix = 0
        self._read = 0

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def push(self, token_id: int) -> str:
        """Add one id; return the text that became printable (possibly ``""``)."""
        self._ids.append(int(token_id))
        prefix_text = self._decode(self._ids[self._prefix : self._read])
        new_text = self._decode(self._ids[self._prefix :])
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(self._ids)
            return new_text[len(prefix_text) :]
        return ""

    def flush(self) -> str:
        """Return whatever is still held back (an incomplete character decodes to U+FFFD)."""
        prefix_text = self._decode(self._ids[self._prefix : self._read])
        new_text = self._decode(self._ids[self._prefix :])
        self._prefix = self._read = len(self._ids)
        return new_text[len(prefix_text) :]
