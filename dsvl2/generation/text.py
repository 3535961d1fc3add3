"""Generated ids back to text: stop strings, streamed deltas, and the finished answer (:class:`Completion`).

:class:`TextStream` is one answer's ids -> text deltas, used by :class:`dsvl2.pipeline.Pipeline` (chat,
stream, batches) and by the serving engine (one stream per request); a stop string is cut out of the
text and anything that could still become one is held back.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ..processing.grounding import GroundingResult, parse_grounding
from ..processing.tokenizer import StreamDecoder


@dataclass
class Completion:
    """A finished answer: text, the generated ids, why it stopped, and token counts.

    ``image_tokens``: the ``<image>`` positions each image of the conversation took, in order;
    ``context_limit``: the model's context (prompt + answer must fit in it).
    """

    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (EOS or a stop string) or "length"
    prompt_tokens: int
    image_tokens: list[int] = field(default_factory=list)
    context_limit: int | None = None

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def grounding(self) -> GroundingResult:
        """Every ``<|ref|>object<|/ref|><|det|>[[...]]<|/det|>`` of the answer (needs special tokens kept)."""
        return parse_grounding(self.text)

    @property
    def context_remaining(self) -> int | None:
        """Tokens of context left after this answer (None when the limit is unknown)."""
        if self.context_limit is None:
            return None
        return self.context_limit - self.prompt_tokens - self.completion_tokens


def _find_stop(text: str, stop: Sequence[str], start: int) -> int | None:
    """Index of the earliest stop string in ``text`` (searching from a little before ``start``)."""
    best = None
    for s in stop:
        if not s:
            continue
        i = text.find(s, max(0, start - len(s)))
        if i != -1 and (best is None or i < best):
            best = i
    return best


class TextStream:
    """One answer's ids -> text deltas: EOS ends it, a stop string cuts it, and text that could still
    turn into a stop string is held back until it cannot. ``push`` each generated id (until ``done``),
    then ``finish`` once; the deltas concatenate to ``completion.text``."""

    def __init__(self, tokenizer: Any, eos_id: int, stop: Sequence[str], skip_special_tokens: bool,
                 prompt_tokens: int, image_tokens: Sequence[int] = (), context_limit: int | None = None):
        self.decoder = StreamDecoder(tokenizer, skip_special_tokens)
        self.eos_id, self.stop, self.prompt_tokens = eos_id, list(stop), prompt_tokens
        self.image_tokens, self.context_limit = list(image_tokens), context_limit
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.text, self.emitted, self.ids = "", 0, []
        self.done, self.reason = False, "length"

    def _release(self, upto: int) -> str:
        delta = self.text[self.emitted:upto] if upto > self.emitted else ""
        self.emitted = max(self.emitted, upto)
        return delta

    def push(self, token: int) -> str:
        if token == self.eos_id:
            self.done, self.reason = True, "stop"
            self.text += self.decoder.flush()
            return ""
        self.ids.append(token)
        self.text += self.decoder.push(token)
        cut = _find_stop(self.text, self.stop, self.emitted)
        if cut is not None:
            self.text, self.done, self.reason = self.text[:cut], True, "stop"
            return ""
        return self._release(len(self.text) - self.hold)

    def finish(self) -> str:
        """The rest of the text (an answer that ran out of tokens is flushed and checked for stops)."""
        if not self.done:
            self.text += self.decoder.flush()
            cut = _find_stop(self.text, self.stop, self.emitted)
            if cut is not None:
                self.text, self.reason = self.text[:cut], "stop"
            self.done = True
        return self._release(len(self.text))

    @property
    def completion(self) -> Completion:
        return Completion(self.text, self.ids, self.reason, self.prompt_tokens, self.image_tokens,
                          self.context_limit)
