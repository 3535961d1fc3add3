"""Continuous batching on token ids: sequences join the running batch between steps and leave when done.

A :class:`Scheduler` owns a :class:`~dsvl2.generation.static.SlotCache` of ``slots`` rows. Each
:meth:`Scheduler.step` does at most two things, in this order:

1. prefill chunks of the sequences still reading their prompts, oldest first, until ``prefill_chunk``
   prompt tokens were run (so several short prompts, or one chunk of a long one), each into its own
   slot (vision runs with a sequence's first chunk); a chunk is ``prefill_chunk`` tokens from the
   start of the prompt (or ``GenerateArgs.chunk_size``), the boundaries a single run with that chunk
   size has; when a prompt is done its first token is sampled from the last position's logits, as
   ``generate`` does;
2. one static decode step (``StepRunner``: a CUDA graph on GPUs) for every sequence past its prompt,
   the batch padded to a bucket of slots ``0..B-1`` and the attention window to a bucket of columns;
   eagerly (CPU) with slot 0 the only one in use, today's ``decode_one_token`` on that slot instead
   (``StepRunner.single``: a lone request decodes as a single run, CPU kernels included).

So a long prompt delays the others by one chunk per step, not by its whole prefill, and a long answer
never holds a short one: a sequence frees its slot the step it ends (EOS, ``max_new_tokens``, the
caller's :meth:`remove` for stop strings or cancellation). Sampling follows ``generate`` per sequence
(its own ``SamplingParams``, repetition-penalty set and seeded ``torch.Generator``); greedy rows are
one ``argmax``. The one host read per step is the new tokens (``tolist``), which callers stream.

New slots are the lowest free ones, so the batch stays compact. Nothing here knows about text or HTTP.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import torch

from ..errors import InputError
from .constraints import LogitsProcessor, apply_processors
from .generate import GenerateArgs, prefill_chunk
from .sampling import sample
from .static import SlotCache, StepRunner, batch_bucket, window_bucket
from ..model.plan import plan_of
from ..model.vlm import DSVL2, positions_from_mask

_ids = itertools.count()


@dataclass(eq=False)
class Sequence:
    """One prompt (a single row: ``input_ids`` (1, T), optional images as the processor gives them)."""

    input_ids: torch.Tensor
    args: GenerateArgs
    images: torch.Tensor | None = None
    images_seq_mask: torch.Tensor | None = None
    images_spatial_crop: torch.Tensor | None = None
    processors: list[LogitsProcessor] = field(default_factory=list)  # one-row processors (box grammar ...)
    uid: int = field(default_factory=lambda: next(_ids))
    # state, kept by the scheduler
    slot: int = -1
    prefilled: int = 0  # prompt tokens in the cache
    generated: list[int] = field(default_factory=list)
    finished: bool = False
    max_new: int = 0
    _embeds: torch.Tensor | None = None
    _seen: torch.Tensor | None = None
    _generator: torch.Generator | None = None

    @property
    def prompt_len(self) -> int:
        return int(self.input_ids.shape[1])

    @property
    def decoding(self) -> bool:
        return self.prefilled == self.prompt_len and not self.finished

    @property
    def length(self) -> int:
        """Tokens in its slot: the prompt plus every generated token but the last (not yet fed)."""
        return self.prefilled + max(len(self.generated) - 1, 0)


class Scheduler:
    """Slots, prefill chunks and batched static decode steps for one model (single-threaded)."""

    def __init__(self, model: DSVL2, eos_token_id: int, slots: int = 8, max_len: int | None = None,
                 prefill_chunk: int = 512, graphs: bool = True):
        cfg = model.cfg.language_config
        self.model, self.eos = model, eos_token_id
        self.max_len = min(max_len or cfg.max_position_embeddings, cfg.max_position_embeddings)
        if prefill_chunk < 1:
            raise InputError(f"prefill_chunk must be >= 1, got {prefill_chunk}")
        self.prefill_chunk = prefill_chunk
        self.cache = SlotCache(cfg, slots, self.max_len, model.dtype, model.device)
        self.runner = StepRunner(model, self.cache, graphs=graphs)
        self.active: list[Sequence] = []  # in arrival order
        self._free = list(range(slots))
        self.failures: list[tuple[Sequence, Exception]] = []  # sequences whose prefill raised; the caller drains it
        self.steps = 0  # decode steps run
        self.max_batch_seen = 0

    @property
    def free_slots(self) -> int:
        return len(self._free)

    def add(self, seq: Sequence) -> None:
        """Give ``seq`` the lowest free slot; it starts prefilling at the next :meth:`step`."""
        t = seq.prompt_len
        if t >= self.max_len:
            raise InputError(f"prompt is {t} tokens; the slots hold {self.max_len}")
        if not self._free:
            raise InputError("no free slot")  # callers check free_slots first
        device = self.model.device
        seq.max_new = min(seq.args.max_new_tokens, self.max_len - t)
        params = seq.args.sampling
        if params.repetition_penalty != 1.0:
            seq._seen = torch.zeros(1, self.model.cfg.language_config.vocab_size, dtype=torch.bool, device=device)
            seq._seen[0, seq.input_ids[0].to(device)] = True
        if not params.greedy:
            seq._generator = torch.Generator(device=device)
            seed = seq.args.seed if seq.args.seed is not None else int(torch.randint(0, 2**62, ()).item())
            seq._generator.manual_seed(seed)
        self._free.sort()
        seq.slot = self._free.pop(0)
        self.active.append(seq)

    def remove(self, seq: Sequence) -> None:
        """Free ``seq``'s slot (finished, stopped by the caller, or cancelled)."""
        if seq in self.active:
            self.active.remove(seq)
            self.cache.lengths[seq.slot] = 0  # an idle slot's step writes at column 0: in range
            self._free.append(seq.slot)
        seq.finished = True

    def clear(self) -> None:
        for seq in list(self.active):
            self.remove(seq)

    def step(self) -> list[tuple[Sequence, int]]:
        """Prefill chunks and one decode step; the (sequence, new token) pairs they produced.

        A sequence whose token ends it (EOS or ``max_new``) is finished and its slot freed; one whose
        prefill raised is removed and listed in :attr:`failures`. A failing decode step raises.
        """
        out = []
        budget = self.prefill_chunk
        for pre in [s for s in self.active if s.prefilled < s.prompt_len]:
            if budget <= 0:
                break
            budget -= min(seq_chunk := pre.args.chunk_size or self.prefill_chunk, pre.prompt_len - pre.prefilled)
            try:
                logits = self._prefill_chunk(pre, seq_chunk)
            except Exception as exc:  # noqa: BLE001  (a bad prompt, e.g. images that do not fit: its own failure)
                self.remove(pre)
                self.failures.append((pre, exc))
                continue
            if logits is not None:
                out.append((pre, self._end_if_done(pre, self._sample([pre], logits)[0])))
        live = [s for s in self.active if s.decoding and s.generated]
        if live:
            n = batch_bucket(max(s.slot for s in live) + 1, self.cache.slots)
            if n == 1 and not self.runner.graphs:  # one request in slot 0, eager: exactly a single run's decode
                logits = self.runner.single(live[0].length)
            else:
                logits = self.runner(n, window_bucket(max(s.length for s in live) + 1, self.max_len))
            rows = torch.tensor([s.slot for s in live], device=logits.device)
            tokens = self._sample(live, logits[rows])
            self.cache.lengths[rows] += 1
            self.steps += 1
            self.max_batch_seen = max(self.max_batch_seen, len(live))
            out += [(s, self._end_if_done(s, tok)) for s, tok in zip(live, tokens, strict=True)]
        return out

    def _end_if_done(self, seq: Sequence, token: int) -> int:
        if token == self.eos or len(seq.generated) >= seq.max_new:
            self.remove(seq)
        return token

    def _prefill_chunk(self, seq: Sequence, chunk: int) -> torch.Tensor | None:
        """The next chunk of ``seq``'s prompt into its slot; its last-position logits once the prompt is done."""
        device, model = self.model.device, self.model
        if seq._embeds is None:
            seq._embeds = model.prepare_inputs_embeds(
                seq.input_ids.to(device), *(None if x is None else x.to(device)
                                            for x in (seq.images, seq.images_seq_mask, seq.images_spatial_crop)))
        t = seq.prompt_len
        start = seq.prefilled
        end = min(start + chunk, t)
        mask = torch.ones(1, t, dtype=torch.bool, device=device)
        expanded = plan_of(model).fused_attention  # the model's execution plan (SDPA / decompressed MLA)
        hidden = prefill_chunk(model, seq._embeds, mask, positions_from_mask(mask), self.cache.row(seq.slot, start),
                               start, end, expanded)
        seq.prefilled = end
        self.cache.lengths[seq.slot] = end
        if end < t:
            return None
        seq._embeds = None
        return model.language.logits(hidden[:, -1:])[:, -1]  # (1, V)

    def _sample(self, seqs: list[Sequence], logits: torch.Tensor) -> list[int]:
        """One token per sequence from its logits row (B, V); fed to its slot at the next step.

        A sequence's logits processors see its row first (``remaining`` counted as ``generate`` does)
        and are advanced with the token chosen."""
        for i, s in enumerate(seqs):
            if s.processors:
                logits[i:i + 1] = apply_processors(s.processors, logits[i:i + 1].float(), s.max_new - len(s.generated))
        greedy = [i for i, s in enumerate(seqs) if s.args.sampling.greedy and s._seen is None]
        tokens = torch.empty(len(seqs), dtype=torch.long, device=logits.device)
        if greedy:
            tokens[greedy] = logits[greedy].argmax(-1)
        for i, s in enumerate(seqs):
            if i not in greedy:
                tokens[i] = sample(logits[i:i + 1], s.args.sampling, s._seen, s._generator)[0]
                if s._seen is not None:
                    s._seen[0, tokens[i]] = True
        for i, s in enumerate(seqs):
            for p in s.processors:
                p.advance(tokens[i:i + 1])
        self.cache.tokens[[s.slot for s in seqs]] = tokens
        values = tokens.tolist()
        for s, tok in zip(seqs, values, strict=True):
            s.generated.append(tok)
        return values
