"""Prefill and decode: the generation loop every front end shares (API, CLI, server, evaluation).

``prefill`` runs the prompt (optionally in chunks, for long image prompts: the cache is written chunk
by chunk and stays on the device) and returns the last position's logits; ``decode_one_token`` feeds
one token per row. ``generate`` yields one token tensor per step; text, stop strings and streaming
live in ``dsvl2.pipeline`` so this module works on ids only. Positions come from the attention mask
(``cumsum - 1``), so left-padded batches give each row the positions it would have alone. Which form
each op takes (SDPA attention, dsvl2's CPU kernels) is the model's execution plan
(``dsvl2.model.plan``), chosen at load; nothing here switches it.
"""

from __future__ import annotations

import functools
import numbers
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, fields

import torch

from ..errors import InputError
from ..model.cache import KVCache, LatentCache, make_cache
from ..model.llm import causal_mask
from ..model.plan import plan_of
from ..model.vlm import DSVL2, positions_from_mask
from .constraints import LogitsProcessor, apply_processors
from .norepeat import NoRepeatNGram
from .sampling import SamplingParams, sample


_FIELD_KINDS = {"max_new_tokens": numbers.Integral, "chunk_size": numbers.Integral,
                "no_repeat_ngram": numbers.Integral, "no_repeat_window": numbers.Integral}
_OPTIONAL = ("chunk_size",)


@dataclass(frozen=True)
class GenerateArgs:
    """Generation settings. ``temperature`` ... ``seed`` are :class:`SamplingParams`' fields (defaults and
    checks live there): construction builds ``sampling`` once, so a bad value fails here, naming it."""

    max_new_tokens: int = 512
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int | None = None
    chunk_size: int | None = None  # prefill chunk length; None = one shot
    compile: bool = False  # decode through torch.compile (opt-in: bf16-close, not bit-identical)
    constrain_boxes: bool = False  # <|det|> spans follow the box grammar (generation.constraints; built in pipeline)
    ordered_boxes: bool = False  # ... and x1 <= x2, y1 <= y2 in every box (generation.box_order; implies constrain)
    # DeepSeek-OCR's no-repeat rule (generation/norepeat.py, built in pipeline): 0 = off; OCR pipelines: 20 / 90.
    no_repeat_ngram: int = 0
    no_repeat_window: int = 90
    no_repeat_whitelist: tuple[int, ...] = ()  # token ids exempt from the ban (<td>, </td>)
    sampling: SamplingParams = field(init=False, repr=False, compare=False)  # from the five fields above

    def __post_init__(self) -> None:
        for name, kind in _FIELD_KINDS.items():
            value = getattr(self, name)
            if not (value is None and name in _OPTIONAL) and (isinstance(value, bool) or not isinstance(value, kind)):
                raise InputError(f"{name} must be {'an integer' if kind is numbers.Integral else 'a number'}"
                                 f"{' or None' if name in _OPTIONAL else ''}, got {value!r}")
        if self.max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.chunk_size is not None and self.chunk_size < 1:
            raise InputError(f"chunk_size must be >= 1, got {self.chunk_size}")
        sampling = SamplingParams(self.temperature, self.top_p, self.top_k, self.repetition_penalty, self.seed)
        object.__setattr__(self, "sampling", sampling)  # frozen: set once here

    @classmethod
    def settings(cls) -> list[str]:
        """The names ``GenerateArgs(...)`` accepts."""
        return [f.name for f in fields(cls) if f.init]

    @property
    def no_repeat(self) -> NoRepeatNGram | None:
        if not self.no_repeat_ngram:
            return None
        return NoRepeatNGram(self.no_repeat_ngram, self.no_repeat_window, frozenset(self.no_repeat_whitelist))


@torch.no_grad()
def prefill(model: DSVL2, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor,
            cache: LatentCache | KVCache, chunk_size: int | None = None, expanded: bool | None = None) -> torch.Tensor:
    """Run the prompt through the LM, filling ``cache``; return last-position logits (B, V) fp32.

    ``expanded``: attention through SDPA / decompressed MLA; None (default) = the model plan's ``fused_attention``.
    """
    expanded = plan_of(model).fused_attention if expanded is None else expanded
    t = inputs_embeds.shape[1]
    positions = positions_from_mask(attention_mask)
    step = chunk_size or t
    hidden = None
    for start in range(0, t, step):
        hidden = prefill_chunk(model, inputs_embeds, attention_mask, positions, cache, start, min(start + step, t),
                               expanded)
    return model.language.logits(hidden[:, -1:])[:, -1]


def prefill_chunk(model: DSVL2, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, positions: torch.Tensor,
                  cache: LatentCache | KVCache, start: int, end: int, expanded: bool = False) -> torch.Tensor:
    """Prompt positions ``start:end`` into ``cache`` (which holds the first ``start``): hidden (B, end-start, D).

    One chunk of :func:`prefill`; the scheduler (``scheduler.py``) runs the chunks of a newcomer between decode steps.
    """
    mask = causal_mask(attention_mask[:, :end], start, end - start, inputs_embeds.dtype)
    return model.language.model(inputs_embeds[:, start:end], positions[:, start:end], mask, cache, expanded)


@torch.no_grad()
def decode_one_token(model: DSVL2, tokens: torch.Tensor, attention_mask: torch.Tensor,
                     cache: LatentCache | KVCache, fused: bool | None = None,
                     padded: bool | None = None) -> torch.Tensor:
    """tokens (B,) at the next position; ``attention_mask`` (B, past+1) already includes them.

    ``fused``: attention through SDPA (``forward_expanded``), bf16-close instead of the reference's
    rounding; None (default) = the model plan's ``fused_attention``.
    ``padded``: whether any row has padding (None: read from the mask, a host sync per step); the
    generation loop decides it once, which also keeps the compiled step free of graph breaks.
    """
    plan = plan_of(model)
    fused = plan.fused_attention if fused is None else fused
    embeds = model.language.model.embed_tokens(tokens[:, None])  # (B, 1, D)
    positions = attention_mask.long().sum(-1, keepdim=True) - 1  # (B, 1)
    mask = causal_mask(attention_mask, cache.length, 1, embeds.dtype, padded)
    hidden = model.language.model(embeds, positions, mask, cache, fused)
    # = model.language.logits(hidden): lm_head in the weights' dtype, then fp32; its largest GEMV
    # through the single-row kernel when the batch is one row.
    return model.language.logits(hidden)[:, -1]  # lm_head in the weights' dtype (one GEMV at batch 1), fp32


@functools.cache
def compiled_decode_one_token() -> Callable[..., torch.Tensor]:
    """``decode_one_token`` through ``torch.compile`` (one per process; shapes dynamic, since the cache
    length grows every step). The first calls compile (tens of seconds on CPU). Inductor fuses the
    elementwise work between matmuls and so rounds bf16 differently: close to eager, not identical.
    """
    return torch.compile(decode_one_token, dynamic=True)


@dataclass
class Step:
    """One generation step: the new token of every row and which rows had already finished."""

    tokens: torch.Tensor  # (B,)
    finished: torch.Tensor  # (B,) bool: True for rows that ended before this step (token is padding)
    logits: torch.Tensor | None = None  # (B, V) fp32 logits the token came from (for tests / scoring)


@torch.no_grad()
def generate(model: DSVL2, input_ids: torch.Tensor, attention_mask: torch.Tensor,
             images: torch.Tensor | None, images_seq_mask: torch.Tensor | None,
             images_spatial_crop: torch.Tensor | None, args: GenerateArgs, eos_token_id: int,
             return_logits: bool = False, processors: Sequence[LogitsProcessor] = ()) -> Iterator[Step]:
    """Yield a :class:`Step` per generated position until every row hit EOS or ``max_new_tokens``.

    ``processors`` (:class:`~dsvl2.generation.constraints.LogitsProcessor`) change each step's logits
    before sampling, in order, and are told the chosen tokens. The caller may stop iterating at any
    time (stop strings, a client that went away).
    """
    cfg = model.cfg.language_config
    b, t = input_ids.shape
    limit = cfg.max_position_embeddings
    if t > limit:
        raise InputError(f"prompt is {t} tokens, longer than the context limit of {limit}")
    new = min(args.max_new_tokens, limit - t)
    if new < 1:
        raise InputError(f"prompt of {t} tokens leaves no room to generate within the context limit of {limit}")
    device = model.device
    attention_mask = attention_mask.to(device).bool()
    embeds = model.prepare_inputs_embeds(
        input_ids.to(device), None if images is None else images.to(device),
        None if images_seq_mask is None else images_seq_mask.to(device),
        None if images_spatial_crop is None else images_spatial_crop.to(device),
    )
    cache = make_cache(cfg, b, t + new, model.dtype, device)
    params = args.sampling
    generator = None
    if not params.greedy:
        generator = torch.Generator(device=device)
        generator.manual_seed(args.seed if args.seed is not None else int(torch.randint(0, 2**62, ()).item()))
    seen = None
    if params.repetition_penalty != 1.0:
        seen = torch.zeros(b, cfg.vocab_size, dtype=torch.bool, device=device)
        seen.scatter_(1, input_ids.to(device).masked_fill(~attention_mask, 0), attention_mask)
    logits = prefill(model, embeds, attention_mask, cache, args.chunk_size)
    finished = torch.zeros(b, dtype=torch.bool, device=device)
    step = compiled_decode_one_token() if args.compile else decode_one_token
    padded = not bool(attention_mask.all())  # decode appends only real tokens: fixed for the whole loop
    for i in range(new):
        logits = apply_processors(processors, logits, new - i)
        token = sample(logits, params, seen, generator)
        token = torch.where(finished, torch.full_like(token, eos_token_id), token)
        for p in processors:
            p.advance(token)
        yield Step(token, finished.clone(), logits if return_logits else None)
        finished = finished | (token == eos_token_id)
        if bool(finished.all()) or i == new - 1:
            return
        if seen is not None:
            seen.scatter_(1, token[:, None], True)
        attention_mask = torch.cat([attention_mask, torch.ones(b, 1, dtype=torch.bool, device=device)], dim=1)
        logits = step(model, token, attention_mask, cache, None, padded)
