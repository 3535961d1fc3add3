"""A static-shape decode step over a slot cache: the step continuous batching and CUDA graphs run.

Today's ``decode_one_token`` attends over ``cache[:length + 1]``: the shapes grow every step and every
row shares one write position (left-padded batches). Here every batch row is a *slot* of a
preallocated cache with its own length, held on the device (``SlotCache.lengths``):

- row ``r`` writes its new key/value (or latent) at column ``lengths[r]`` (an ``index_put``) and attends
  over the first ``window`` columns with a length mask (``col <= lengths[r]``, the same additive
  ``finfo.min`` mask as ``causal_mask``); columns past a row's length hold stale values that the mask
  hides and that the row overwrites before it ever reads them;
- positions (RoPE) are ``lengths[r]``: slots are never padded;
- the MoE runs its usual dispatch, whose buffers are already sized by the token count alone (grouped
  GEMM with device-side offsets); under CUDA-graph capture, where the per-expert loop's host sync is
  impossible, ``Experts`` takes its gathered-weight form instead;
- for a given (batch, window) nothing on the host changes from step to step and nothing is read back:
  the step can be captured once and replayed (:class:`StepRunner`).

It is the same model code as ``decode_one_token`` (the same modules, called with a mask and a cache
whose ``update`` writes per row), so with the same batch and ``window`` equal to the cache length it
gives the same numbers bit for bit; over a longer window BLAS sums the extra (zero) terms in another
blocking, so it is close (fp32: within 1e-5) with the same greedy tokens (tests/test_static_decode.py).
"""

from __future__ import annotations

import copy

import torch

from ..config import LanguageConfig
from ..errors import InputError
from ..model.cache import KVCache, LatentCache, make_cache
from ..model.llm import causal_mask
from ..model.plan import plan_of
from ..model.vlm import DSVL2
from .generate import decode_one_token

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
MIN_WINDOW = 64


def batch_bucket(n: int, slots: int) -> int:
    """The smallest bucket >= ``n`` (capped at ``slots``): batches are padded to few distinct sizes."""
    return min(next((b for b in BATCH_BUCKETS if b >= n), n), slots)


def window_bucket(n: int, max_len: int) -> int:
    """The smallest power-of-two multiple of ``MIN_WINDOW`` >= ``n`` columns, capped at ``max_len``."""
    w = MIN_WINDOW
    while w < n:
        w *= 2
    return min(w, max_len)


class SlotCache:
    """A preallocated cache of ``slots`` rows (``make_cache``'s layout) with per-slot lengths on the device.

    ``lengths[s]``: tokens cached in slot ``s`` (the column its next token is written at).
    ``tokens[s]``: the token the next decode step feeds to slot ``s``. Both are fixed buffers, so a
    captured step reads them in place.
    """

    def __init__(self, cfg: LanguageConfig, slots: int, max_len: int, dtype: torch.dtype,
                 device: torch.device | str):
        if slots < 1 or max_len < 2:
            raise InputError(f"a slot cache needs >= 1 slot and >= 2 columns, got {slots} x {max_len}")
        self.store = make_cache(cfg, slots, max_len, dtype, device)
        self.slots, self.max_len = slots, max_len
        self.lengths = torch.zeros(slots, dtype=torch.long, device=device)
        self.tokens = torch.zeros(slots, dtype=torch.long, device=device)

    def row(self, slot: int, length: int = 0) -> LatentCache | KVCache:
        """A batch-1 cache over slot ``slot`` (its tensors are views) holding ``length`` tokens: for prefill."""
        view = copy.copy(self.store)
        for name in ("latent", "rope_key", "k", "v"):
            if hasattr(view, name):
                setattr(view, name, getattr(view, name)[:, slot:slot + 1])
        view.max_len, view.length = self.max_len, length
        return view

    def step_view(self, batch: int, window: int) -> StepCache:
        return StepCache(self.store, self.lengths[:batch], window)


class StepCache:
    """What the attention modules see during a static step: ``update`` writes row ``r``'s one new entry
    at ``pos[r]`` and returns the first ``window`` columns of slots ``0..B-1``; room and lengths are
    the scheduler's business (``check_room`` / ``advance`` do nothing)."""

    def __init__(self, store: LatentCache | KVCache, pos: torch.Tensor, window: int):
        self.store, self.pos, self.window = store, pos, window
        self.rows = torch.arange(pos.shape[0], device=pos.device)

    def check_room(self, new_tokens: int) -> None:
        pass

    def advance(self, new_tokens: int) -> None:
        pass

    def update(self, layer: int, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n, w = self.rows.shape[0], self.window
        if isinstance(self.store, KVCache):  # a, b: k, v (B, H, 1, D)
            k, v = self.store.k[layer], self.store.v[layer]
            k[self.rows, :, self.pos] = a[:, :, 0]
            v[self.rows, :, self.pos] = b[:, :, 0]
            return k[:n, :, :w], v[:n, :, :w]
        latent, rope = self.store.latent[layer], self.store.rope_key[layer]  # a, b: (B, 1, r), (B, 1, rope)
        latent[self.rows, self.pos] = a[:, 0]
        rope[self.rows, self.pos] = b[:, 0]
        return latent[:n, :w], rope[:n, :w]


@torch.no_grad()
def static_decode_step(model: DSVL2, tokens: torch.Tensor, cache: StepCache,
                       fused: bool | None = None) -> torch.Tensor:
    """tokens (B,) at positions ``cache.pos`` -> fp32 logits (B, V); the cache gets their entries.

    The body of ``decode_one_token`` with a per-row length mask in place of the grown attention mask;
    ``fused`` None (default) = the model plan's ``fused_attention``.
    """
    fused = plan_of(model).fused_attention if fused is None else fused
    pos = cache.pos
    embeds = model.language.model.embed_tokens(tokens[:, None])  # (B, 1, D)
    valid = torch.arange(cache.window, device=pos.device)[None, :] <= pos[:, None]  # (B, W)
    mask = causal_mask(valid, cache.window - 1, 1, embeds.dtype, padded=True)  # (B, 1, 1, W)
    hidden = model.language.model(embeds, pos[:, None], mask, cache, fused)
    return model.language.logits(hidden)[:, -1]  # lm_head as the plan runs it, then fp32


class StepRunner:
    """Runs :func:`static_decode_step` on slots ``0..batch-1`` of a :class:`SlotCache`.

    On CUDA (unless ``graphs=False``) the step of each (batch, window) pair is captured into a
    ``torch.cuda.CUDAGraph`` on first use (after two warm-up runs on a side stream; all graphs share
    one memory pool) and replayed afterwards: one launch per step instead of ~1000. Inputs are read
    in place from ``cache.tokens`` / ``cache.lengths``; the returned logits are the graph's own output
    buffer, overwritten by the next replay. Elsewhere the step runs eagerly.
    """

    def __init__(self, model: DSVL2, cache: SlotCache, graphs: bool = True, fused: bool | None = None):
        self.model, self.cache = model, cache
        self.fused = plan_of(model).fused_attention if fused is None else fused  # the model's plan by default
        self.graphs = graphs and cache.lengths.device.type == "cuda"
        self._graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._pool = None

    def _eager(self, batch: int, window: int) -> torch.Tensor:
        view = self.cache.step_view(batch, window)
        return static_decode_step(self.model, self.cache.tokens[:batch], view, self.fused)

    def __call__(self, batch: int, window: int) -> torch.Tensor:
        if not self.graphs:
            return self._eager(batch, window)
        key = (batch, window)
        if key not in self._graphs:
            self._graphs[key] = self._capture(batch, window)
        graph, out = self._graphs[key]
        graph.replay()
        return out

    def single(self, length: int) -> torch.Tensor:
        """Slot 0 alone, holding ``length`` tokens, eagerly: today's ``decode_one_token`` over a batch-1 view
        of the slot, so one running request decodes bit for bit as a single run (CPU kernels included)."""
        mask = torch.ones(1, length + 1, dtype=torch.bool, device=self.cache.tokens.device)
        return decode_one_token(self.model, self.cache.tokens[:1], mask, self.cache.row(0, length), self.fused,
                                padded=False)

    @property
    def captured(self) -> list[tuple[int, int]]:
        return sorted(self._graphs)

    def _capture(self, batch: int, window: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        # Warm-up writes each row's entry at its current length, which the replay rewrites: harmless.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self._eager(batch, window)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            out = self._eager(batch, window)
        self._pool = graph.pool()
        return graph, out
