"""The user-facing pipeline: ``dsvl2.load(dir)`` -> chat / stream / batch / ground.

One model, one processor, one generation loop (``generation.generate``); this module only turns
text + images into a batch and tokens back into text, with stop strings and streaming
(``generation.text``: :class:`TextStream`, :class:`Completion`). The CLI, the server and the
evaluation harness are thin layers over it.

Message format (OpenAI-like, plus the official one): ``{"role": "user"|"assistant"|"system"|
"<|User|>"|"<|Assistant|>", "content": str, "images": [path | PIL.Image]}``. A plain string is one
user turn. When a user turn carries more images than ``<image>`` placeholders, the missing
placeholders are prepended as ``"<image>\\n"`` lines (the official web demo's rule); more
placeholders than images is an error.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from .checkpoint import load_model
from .errors import ContextLengthError, InputError
from .generation.box_order import OrderedBoxConstraint
from .generation.constraints import BoxConstraint, LogitsProcessor, box_automaton
from .generation.generate import GenerateArgs, generate
from .generation.norepeat import NoRepeatProcessor
from .generation.text import Completion, TextStream
from .model.ocr2 import DeepseekOCR2
from .model.plan import Plan, plan_of
from .model.plan import apply as apply_plan
from .model.plan import resolve as resolve_plan
from .model.vlm import DSVL2
from .processing.grounding import GroundingResult, parse_grounding
from .processing.ocr2 import OCR2Processor
from .processing.processor import Batch, Processor

ImageLike = str | Path | Image.Image
Messages = str | Sequence[dict[str, Any]]

DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
          "fp32": torch.float32, "float32": torch.float32}


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise InputError(f"unknown dtype {dtype!r}; choose one of {sorted(DTYPES)}")
    return DTYPES[dtype]


OCR_NO_REPEAT = {"no_repeat_ngram": 20, "no_repeat_window": 90}  # official run_dpsk_ocr2_image.py


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


class Pipeline:
    """A loaded model with its processor. Create with :func:`dsvl2.load`."""

    def __init__(self, model: DSVL2 | DeepseekOCR2, processor: Processor | OCR2Processor,
                 model_dir: str | Path | None = None):
        self.model = model
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.model_dir = Path(model_dir) if model_dir is not None else None

    @property
    def plan(self) -> Plan:
        """How the model's ops run (chosen at load; ``exact=True`` for the reference path)."""
        return plan_of(self.model)

    # ---- input normalisation ---------------------------------------------------------------
    def conversation(self, messages: Messages, images: Sequence[ImageLike] | None = None) -> list[dict[str, Any]]:
        """Normalise ``messages`` (+ ``images`` for the last user turn) into processor messages."""
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        if not isinstance(messages, Sequence) or not all(isinstance(m, Mapping) for m in messages):
            raise InputError(f"messages must be a string or a list of message dicts, got {str(messages)[:80]!r}")
        conv = [dict(m) for m in messages]
        if not conv:
            raise InputError("messages is empty")
        for m in conv:
            if not isinstance(m.get("content", ""), str):
                raise InputError(f"message content must be a string, got {type(m.get('content')).__name__}")
        if images:
            users = [m for m in conv if m.get("role") in ("user", "<|User|>")]
            if not users:
                raise InputError("images were given but the conversation has no user turn")
            users[-1]["images"] = list(users[-1].get("images") or []) + list(images)
        for m in conv:
            imgs = m.get("images") or []
            if imgs:
                m["images"] = [self.processor.load_image(x) for x in imgs]
                tags = m["content"].count("<image>")
                if tags > len(imgs):
                    raise InputError(f"a message has {tags} <image> placeholders but {len(imgs)} image(s)")
                m["content"] = "<image>\n" * (len(imgs) - tags) + m["content"]
        return conv

    @property
    def context_limit(self) -> int:
        return self.model.cfg.language_config.max_position_embeddings

    def prepare(self, conversations: Sequence[list[dict[str, Any]]], image_token_budget: int | None = None,
                truncate: str | None = None, limit: int | None = None) -> Batch:
        """Process conversations into one batch, each checked against the context (see :meth:`fit`)."""
        if truncate not in (None, "oldest"):
            raise InputError(f"truncate must be None or 'oldest', got {truncate!r}")
        convs = [list(c) for c in conversations]
        batch = self.processor(convs, image_token_budget=image_token_budget)
        lengths = batch.attention_mask.sum(-1).tolist()
        over = [r for r, n in enumerate(lengths) if n >= (limit or self.context_limit)]
        if not over:
            return batch
        for r in over:
            where = f"conversation {r}: " if len(convs) > 1 else ""
            convs[r] = self.fit(convs[r], image_token_budget, truncate, limit, where)[0]
        return self.processor(convs, image_token_budget=image_token_budget)

    def fit(self, conversation: list[dict[str, Any]], image_token_budget: int | None = None,
            truncate: str | None = None, limit: int | None = None, where: str = "",
            ) -> tuple[list[dict[str, Any]], Batch]:
        """The conversation (oldest turns dropped if needed and asked for) and its one-row batch.

        ``image_token_budget``: tile layouts chosen to fit that many image tokens
        (:mod:`dsvl2.processing.budget`). A prompt that leaves no room under ``limit`` (default: the
        model's context) raises :class:`ContextLengthError` naming each image and its token count,
        unless ``truncate="oldest"``: then the oldest exchanges are dropped (a leading system
        message stays) until it fits, as the official web demo does.
        """
        if truncate not in (None, "oldest"):
            raise InputError(f"truncate must be None or 'oldest', got {truncate!r}")
        limit = limit or self.context_limit
        conv = list(conversation)
        while True:
            batch = self.processor([conv], image_token_budget=image_token_budget)
            length = int(batch.attention_mask.sum())
            if length < limit:
                return conv, batch
            shorter = _drop_oldest_turn(conv) if truncate == "oldest" else None
            if shorter is None:
                raise ContextLengthError(where + _overflow_message(conv, length, batch.num_image_tokens[0], limit))
            conv = shorter

    # ---- generation ----------------------------------------------------------------------------
    def generate_args(self, **gen: Any) -> GenerateArgs:
        """:class:`GenerateArgs` from ``gen``; DeepSeek-OCR 2 models default to the official no-repeat
        rule (20-grams within 90 tokens, ``<td>`` / ``</td>`` exempt) unless ``no_repeat_ngram`` is given."""
        if isinstance(self.model, DeepseekOCR2) and "no_repeat_ngram" not in gen:
            gen = {**gen, **OCR_NO_REPEAT, "no_repeat_whitelist": self.table_token_ids()}
        unknown = sorted(set(gen) - set(GenerateArgs.settings()))
        if unknown:
            raise InputError(f"unknown generation setting(s) {unknown}; the fields of GenerateArgs are "
                             f"{GenerateArgs.settings()}")
        return GenerateArgs(**gen)

    def table_token_ids(self) -> tuple[int, ...]:
        """Ids of ``<td>`` and ``</td>`` in this tokenizer (those that exist)."""
        ids = (self.tokenizer.find_token(t) for t in ("<td>", "</td>"))
        return tuple(i for i in ids if i is not None)

    def text_stream(self, batch: Batch, row: int, stop: Sequence[str], skip_special_tokens: bool) -> TextStream:
        """How row ``row`` of ``batch`` turns its generated ids into text (the server's engine uses it too)."""
        prompt = int(batch.attention_mask[row].sum())
        image_tokens = list(batch.num_image_tokens[row]) if batch.num_image_tokens else []
        return TextStream(self.tokenizer, self.tokenizer.eos_id, stop, skip_special_tokens, prompt,
                          image_tokens, self.context_limit)

    def events(self, batch: Batch, args: GenerateArgs, stop: Sequence[str],
               skip_special_tokens: bool) -> Iterator[tuple[int, str] | list[Completion]]:
        """Generate for every row of ``batch``.

        Yields ``(row, text_delta)`` as text becomes final (text that could still turn into a stop
        string is held back), and finally the list of :class:`Completion`.
        """
        streams = [self.text_stream(batch, r, stop, skip_special_tokens) for r in range(len(batch))]
        steps = generate(self.model, batch.input_ids, batch.attention_mask, batch.images, batch.images_seq_mask,
                         batch.images_spatial_crop, args, self.tokenizer.eos_id,
                         processors=self.processors(args, len(batch)))
        try:
            for step in steps:
                for r, tok in enumerate(step.tokens.tolist()):
                    if not streams[r].done and (delta := streams[r].push(tok)):
                        yield r, delta
                if all(s.done for s in streams):
                    break
        finally:
            steps.close()
        for r, s in enumerate(streams):
            if delta := s.finish():
                yield r, delta
        yield [s.completion for s in streams]

    def processors(self, args: GenerateArgs, batch_size: int) -> list[LogitsProcessor]:
        """The logits processors ``args`` asks for (``constrain_boxes``: the box grammar;
        ``ordered_boxes``: also x1 <= x2 and y1 <= y2; ``no_repeat_ngram``: the OCR no-repeat rule)."""
        out: list[LogitsProcessor] = []
        if args.constrain_boxes or args.ordered_boxes:
            automaton = box_automaton(self.tokenizer, self.model.cfg.language_config.vocab_size)
            kind = OrderedBoxConstraint if args.ordered_boxes else BoxConstraint
            out.append(kind(automaton, batch_size, self.model.device))
        if args.no_repeat is not None:  # DeepSeek-OCR's no-repeat n-gram rule (generation/norepeat.py)
            out.append(NoRepeatProcessor(args.no_repeat, batch_size))
        return out

    def _run(self, batch: Batch, args: GenerateArgs, stop: Sequence[str], skip_special_tokens: bool) -> list[Completion]:
        result: list[Completion] = []
        for event in self.events(batch, args, stop, skip_special_tokens):
            if isinstance(event, list):
                result = event
        return result

    def complete(self, messages: Messages, images: Sequence[ImageLike] | None = None, *,
                 stop: Sequence[str] = (), skip_special_tokens: bool = True, image_token_budget: int | None = None,
                 truncate: str | None = None, **gen: Any) -> Completion:
        """One answer with its metadata (token ids, finish reason, token counts, image tokens, context).

        ``image_token_budget`` / ``truncate``: see :meth:`prepare`.
        """
        batch = self.prepare([self.conversation(messages, images)], image_token_budget, truncate)
        return self._run(batch, self.generate_args(**gen), stop, skip_special_tokens)[0]

    def chat(self, messages: Messages, images: Sequence[ImageLike] | None = None, *,
             stop: Sequence[str] = (), skip_special_tokens: bool = True, image_token_budget: int | None = None,
             truncate: str | None = None, **gen: Any) -> str:
        """The answer to ``messages`` as text. ``gen``: fields of :class:`GenerateArgs`."""
        return self.complete(messages, images, stop=stop, skip_special_tokens=skip_special_tokens,
                             image_token_budget=image_token_budget, truncate=truncate, **gen).text

    def stream(self, messages: Messages, images: Sequence[ImageLike] | None = None, *,
               stop: Sequence[str] = (), skip_special_tokens: bool = True, image_token_budget: int | None = None,
               truncate: str | None = None, **gen: Any) -> Iterator[str]:
        """Yield the answer in pieces as it is generated (they concatenate to :meth:`chat`'s text).

        Closing the iterator early stops generation.
        """
        batch = self.prepare([self.conversation(messages, images)], image_token_budget, truncate)
        for event in self.events(batch, self.generate_args(**gen), stop, skip_special_tokens):
            if isinstance(event, tuple):
                yield event[1]

    def generate_batch(self, conversations: Sequence[Messages], *, max_new_tokens: int = 512,
                       skip_special_tokens: bool = True, chunk_size: int | None = None,
                       stop: Sequence[str] = (), image_token_budget: int | None = None, **gen: Any) -> list[str]:
        """Answers for many conversations decoded together (greedy by default); rows equal singles."""
        return [c.text for c in self.complete_batch(conversations, max_new_tokens=max_new_tokens,
                                                    skip_special_tokens=skip_special_tokens, chunk_size=chunk_size,
                                                    stop=stop, image_token_budget=image_token_budget, **gen)]

    def complete_batch(self, conversations: Sequence[Messages], *, max_new_tokens: int = 512,
                       skip_special_tokens: bool = True, chunk_size: int | None = None,
                       stop: Sequence[str] = (), image_token_budget: int | None = None,
                       **gen: Any) -> list[Completion]:
        """:meth:`generate_batch` with each answer's metadata (token ids, finish reason, counts)."""
        convs = [self.conversation(c) for c in conversations]
        batch = self.prepare(convs, image_token_budget)
        args = self.generate_args(max_new_tokens=max_new_tokens, chunk_size=chunk_size, **gen)
        return self._run(batch, args, stop, skip_special_tokens)

    def ground(self, image: ImageLike, expression: str, **gen: Any) -> GroundingResult:
        """Locate ``expression`` in ``image``: boxes in 0-999 coordinates (``Box.to_pixels`` for pixels).

        Box-constrained decoding is on unless ``constrain_boxes=False`` is given.
        """
        gen.setdefault("constrain_boxes", True)
        text = self.chat(f"<image>\n<|ref|>{expression}<|/ref|>.", [image], skip_special_tokens=False, **gen)
        return parse_grounding(text)


def _drop_oldest_turn(conv: list[dict[str, Any]]) -> list[dict[str, Any]] | None:
    """``conv`` without its oldest exchange (up to the next user turn; a leading system message stays),
    or None when only the last user turn is left."""
    head = 1 if conv and conv[0].get("role") == "system" else 0
    users = [i for i, m in enumerate(conv) if i >= head and m.get("role") in ("user", "<|User|>")]
    if len(users) < 2:
        return None
    return conv[:head] + conv[users[1]:]


def _overflow_message(conv: list[dict[str, Any]], length: int, image_tokens: list[int], limit: int) -> str:
    """Which images take how many tokens, for a prompt that does not fit the context."""
    images = [im for m in conv for im in m.get("images") or []]
    parts = []
    for n, (im, tokens) in enumerate(zip(images, image_tokens), 1):
        name = im.info.get("source") if isinstance(im, Image.Image) else str(im)
        size = f"{im.width}x{im.height}" if isinstance(im, Image.Image) else "?"
        parts.append(f"image {n} ({name + ', ' if name else ''}{size}) takes {tokens} tokens")
    text = length - sum(image_tokens)
    detail = "; ".join(parts + [f"the text takes {text}"])
    return (f"the prompt is {length} tokens, over the context limit of {limit} ({detail}); "
            "lower image_token_budget, send fewer images, or drop old turns (truncate='oldest')")


def load(model_dir: str | Path | None = None, dtype: str | torch.dtype = "bf16", device: str | None = None,
         progress: Callable[[int, int], None] | None = None, quantize: str | None = None,
         exact: bool = False) -> Pipeline:
    """Load a model directory in the official Hugging Face layout (config, safetensors, tokenizer).

    ``quantize="int8"``: int8 weight-only language model (about half the memory and bytes per token);
    ``"int4"``: int4 with group-wise scales (about a quarter).
    The model runs the fast execution plan for this machine (``dsvl2.model.plan``: SDPA attention; on
    CPU in bf16, dsvl2's C kernels for decode and the vision GELU, the build chosen for this CPU), which
    is bf16-close to the reference; ``exact=True`` runs every op in its reference form (the path the
    parity tests hold to the official numbers). ``pipe.plan`` says what was chosen and why.
    """
    if model_dir is None:
        from .assets import default_model_dir

        model_dir = default_model_dir()
    device = device or default_device()
    model = load_model(model_dir, dtype=resolve_dtype(dtype), device=device, progress=progress, quantize=quantize)
    apply_plan(model, resolve_plan(model.device, model.dtype, exact))
    if isinstance(model, DeepseekOCR2):
        processor: Processor | OCR2Processor = OCR2Processor.from_pretrained(model_dir, model.cfg)
    else:
        processor = Processor.from_pretrained(model_dir)
    return Pipeline(model, processor, model_dir)
