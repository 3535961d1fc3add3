"""A request queue and one worker thread that batches requests through ``Pipeline.events``.

The HTTP layer prepares each request (images decoded, prompt tokenised and checked against the
context limit) and submits an :class:`EngineRequest`; the worker takes the oldest waiting request,
waits ``batch_wait_s`` for company, and runs it together with every waiting request that has the
same *batch key*, up to ``max_batch_size``, as one left-padded batch (rows equal singles, so greedy
answers do not depend on their neighbours). One batch shares one ``GenerateArgs`` and one stop list:

- greedy requests (temperature 0) batch when max_tokens, stop and the other settings are equal;
- sampled requests without a seed batch with equal settings (each row draws its own tokens);
- a sampled request with a ``seed`` runs alone, so the seed alone decides its tokens.

A batch runs to completion before the next starts (no continuous batching: ``Pipeline.events``
works on a fixed batch); requests that arrive meanwhile wait in the queue. Events reach the caller
through ``on_event`` from the worker thread: ``("delta", str)``, then ``("done", Completion)`` or
``("error", Exception)``.

Cancellation: :meth:`EngineRequest.cancel` (a client went away) drops a queued request before it
runs; in a running batch the row's output is discarded, and once every row of the batch is
cancelled the worker closes the generator, which stops generation at the next token.
"""

from __future__ import annotations

import collections
import itertools
import threading
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..generation.generate import GenerateArgs
from ..pipeline import Completion, Pipeline
from ..processing.processor import Batch

Event = tuple[str, Any]
_ids = itertools.count()


class QueueFull(Exception):
    """The engine already holds ``max_queue`` waiting requests."""


class EngineStopped(Exception):
    """The engine was shut down before the request could run."""


@dataclass(eq=False)
class EngineRequest:
    """One conversation to answer. ``batch`` is its own single-row prepared :class:`Batch`."""

    conversation: list[dict[str, Any]]
    batch: Batch
    args: GenerateArgs
    stop: Sequence[str]
    on_event: Callable[[Event], None]
    skip_special_tokens: bool = False
    image_token_budget: int | None = None  # re-preparing a batch of several keeps each row's tile layouts
    cancelled: threading.Event = field(default_factory=threading.Event)
    uid: int = field(default_factory=lambda: next(_ids))

    def cancel(self) -> None:
        self.cancelled.set()

    @property
    def batch_key(self) -> Hashable:
        if self.args.temperature > 0 and self.args.seed is not None:
            return ("alone", self.uid)
        return (self.args, tuple(self.stop), self.skip_special_tokens, self.image_token_budget)


@dataclass
class EngineStats:
    queued: int = 0
    running: int = 0
    completed: int = 0
    cancelled: int = 0  # requests whose client went away
    aborted_batches: int = 0  # batches stopped early because every row was cancelled
    batches: int = 0
    max_batch_seen: int = 0


class Engine:
    """Owns the pipeline: one worker thread runs batches, callers submit from any thread."""

    def __init__(self, pipe: Pipeline, max_batch_size: int = 8, max_queue: int = 64, batch_wait_s: float = 0.01):
        if max_batch_size < 1 or max_queue < 1:
            raise ValueError(f"max_batch_size ({max_batch_size}) and max_queue ({max_queue}) must be >= 1")
        self.pipe = pipe
        self.max_batch_size, self.max_queue, self.batch_wait_s = max_batch_size, max_queue, batch_wait_s
        self.stats = EngineStats()
        self._queue: collections.deque[EngineRequest] = collections.deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None

    # ---- lifecycle -------------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="dsvl2-engine", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Refuse new work, fail what is queued, cancel what runs, and join the worker."""
        with self._cond:
            self._stopping = True
            waiting, self._queue = list(self._queue), collections.deque()
            self.stats.queued = 0
            self._cond.notify_all()
        for req in waiting:
            req.on_event(("error", EngineStopped("the server is shutting down")))
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def submit(self, req: EngineRequest) -> None:
        with self._cond:
            if self._stopping:
                raise EngineStopped("the server is shutting down")
            if len(self._queue) >= self.max_queue:
                raise QueueFull(f"{len(self._queue)} requests are already waiting (limit {self.max_queue})")
            self._queue.append(req)
            self.stats.queued = len(self._queue)
            self._cond.notify_all()

    # ---- worker --------------------------------------------------------------------------------------
    def _take_group(self) -> list[EngineRequest] | None:
        """Block for the oldest live request, then collect its batch mates; None when stopping."""
        with self._cond:
            while True:
                while not self._queue and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    return None
                first = self._queue.popleft()
                if first.cancelled.is_set():
                    self.stats.cancelled += 1
                    self.stats.queued = len(self._queue)
                    continue
                break
            deadline = time.monotonic() + self.batch_wait_s
            while len(self._queue) < self.max_batch_size - 1 and not self._stopping:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            group, rest = [first], collections.deque()
            for req in self._queue:
                if req.cancelled.is_set():
                    self.stats.cancelled += 1
                elif req.batch_key == first.batch_key and len(group) < self.max_batch_size:
                    group.append(req)
                else:
                    rest.append(req)
            self._queue = rest
            self.stats.queued = len(rest)
            self.stats.running = len(group)
            self.stats.batches += 1
            self.stats.max_batch_seen = max(self.stats.max_batch_seen, len(group))
            return group

    def _loop(self) -> None:
        while True:
            group = self._take_group()
            if group is None:
                return
            try:
                self._run(group)
            finally:
                with self._cond:
                    self.stats.running = 0

    def _run(self, group: list[EngineRequest]) -> None:
        first = group[0]
        events = None
        finished = False
        try:
            batch = (first.batch if len(group) == 1
                     else self.pipe.prepare([r.conversation for r in group], first.image_token_budget))
            events = self.pipe.events(batch, first.args, first.stop, first.skip_special_tokens)
            for event in events:
                if isinstance(event, list):
                    self._finish(group, event)
                    finished = True
                    break
                row, delta = event
                if not group[row].cancelled.is_set():
                    group[row].on_event(("delta", delta))
                if self._stopping or all(r.cancelled.is_set() for r in group):
                    self.stats.aborted_batches += 1
                    break
        except Exception as exc:  # noqa: BLE001  (any failure reaches every request of the batch)
            finished = True
            for req in group:
                req.on_event(("error", exc))
        finally:
            if events is not None:
                events.close()  # stops generation when the loop was left early
            self.stats.cancelled += sum(r.cancelled.is_set() for r in group)
            if not finished:
                for req in group:
                    req.on_event(("error", EngineStopped("generation was stopped before it finished")))

    def _finish(self, group: list[EngineRequest], completions: list[Completion]) -> None:
        for req, completion in zip(group, completions, strict=True):
            if not req.cancelled.is_set():
                req.on_event(("done", completion))
                self.stats.completed += 1
