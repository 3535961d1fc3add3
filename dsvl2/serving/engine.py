"""A bounded request queue and one worker thread that batches requests continuously.

The HTTP layer prepares each request (images decoded, prompt tokenised and checked against the
context limit) and submits an :class:`EngineRequest`; :meth:`Engine.submit` refuses it with
:class:`QueueFull` when ``max_queue`` requests already wait (never blocks). The worker thread owns
the model through a :class:`~dsvl2.generation.scheduler.Scheduler` of ``max_batch_size`` slots and loops:

1. admit waiting requests into free slots (oldest first; cancelled ones are dropped);
2. free the slots of running requests whose client went away (:meth:`EngineRequest.cancel`);
3. ``Scheduler.step()``: one prefill chunk of a newcomer, one decode step of everyone else;
4. turn each new token into text (``Pipeline.text_stream``: stop strings, held-back text) and
   report it through ``on_event`` from the worker thread: ``("delta", str)``, then
   ``("done", Completion)`` or ``("error", Exception)``. A stop string frees the slot at once.

Requests of any settings share the batch: each row samples with its own parameters and seed.
Greedy rows equal their single runs (tests/test_serving_engine.py).
"""

from __future__ import annotations

import collections
import itertools
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import InputError
from ..generation import scheduler
from ..generation.generate import GenerateArgs
from ..generation.text import TextStream
from ..pipeline import Pipeline
from ..processing.processor import Batch

Event = tuple[str, Any]
_ids = itertools.count()


class QueueFull(Exception):
    """The engine already holds ``max_queue`` waiting requests; ``retry_after`` seconds is a fair wait."""

    def __init__(self, message: str, retry_after: int = 1):
        super().__init__(message)
        self.retry_after = retry_after


class EngineStopped(Exception):
    """The engine was shut down before the request could finish."""


@dataclass(eq=False)
class EngineRequest:
    """One conversation to answer. ``batch`` is its own single-row prepared :class:`Batch`."""

    conversation: list[dict[str, Any]]
    batch: Batch
    args: GenerateArgs
    stop: Sequence[str]
    on_event: Callable[[Event], None]
    skip_special_tokens: bool = False
    cancelled: threading.Event = field(default_factory=threading.Event)
    uid: int = field(default_factory=lambda: next(_ids))

    def cancel(self) -> None:
        self.cancelled.set()


@dataclass
class EngineStats:
    queued: int = 0
    running: int = 0
    completed: int = 0
    cancelled: int = 0  # requests whose client went away (queued or running)
    aborted: int = 0  # of those, the ones stopped while generating
    failed: int = 0  # requests answered with an error event
    steps: int = 0  # decode steps run
    max_batch_seen: int = 0  # most sequences decoded in one step
    slots: int = 0


@dataclass(eq=False)
class _Running:
    req: EngineRequest
    seq: scheduler.Sequence
    stream: TextStream


class Engine:
    """Owns the pipeline: one worker thread runs the scheduler, callers submit from any thread."""

    def __init__(self, pipe: Pipeline, max_batch_size: int = 8, max_queue: int = 64, prefill_chunk: int = 512,
                 cuda_graphs: bool = True, max_len: int | None = None):
        if max_batch_size < 1 or max_queue < 1:
            raise InputError(f"max_batch_size ({max_batch_size}) and max_queue ({max_queue}) must be >= 1")
        self.pipe = pipe
        self.max_queue = max_queue
        self.scheduler = scheduler.Scheduler(pipe.model, pipe.tokenizer.eos_id, max_batch_size, max_len,
                                             prefill_chunk, cuda_graphs)
        self.stats = EngineStats(slots=max_batch_size)
        self._queue: collections.deque[EngineRequest] = collections.deque()
        self._running: dict[scheduler.Sequence, _Running] = {}
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None

    # ---- lifecycle -------------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="dsvl2-engine", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Refuse new work, fail what is queued and what runs, and join the worker."""
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
    def _admit(self) -> list[EngineRequest]:
        """Block until there is work; pop the requests that fit into free slots (the lock is held)."""
        while not self._queue and not self._running and not self._stopping:
            self._cond.wait()
        taken = []
        while self._queue and len(taken) < self.scheduler.free_slots and not self._stopping:
            req = self._queue.popleft()
            if req.cancelled.is_set():
                self.stats.cancelled += 1
            else:
                taken.append(req)
        self.stats.queued = len(self._queue)
        return taken

    def _loop(self) -> None:
        try:
            while True:
                with self._cond:
                    taken = self._admit()
                    if self._stopping:
                        break
                for req in taken:
                    self._start(req)
                for run in [r for r in self._running.values() if r.req.cancelled.is_set()]:
                    self._drop(run)
                    self.stats.cancelled += 1
                    self.stats.aborted += 1
                self.stats.running = len(self._running)
                if self._running:
                    self._step()
                self.stats.running = len(self._running)
        finally:
            for run in list(self._running.values()):
                self._fail(run, EngineStopped("generation was stopped before it finished"))
            self.stats.running = 0

    def _start(self, req: EngineRequest) -> None:
        b = req.batch
        try:
            if len(b) != 1 or not bool(b.attention_mask.all()):
                raise InputError("an engine request must be one unpadded row")
            seq = scheduler.Sequence(b.input_ids, req.args, b.images, b.images_seq_mask, b.images_spatial_crop,
                                     processors=self.pipe.processors(req.args, 1))
            stream = self.pipe.text_stream(b, 0, req.stop, req.skip_special_tokens)
            self.scheduler.add(seq)
        except Exception as exc:  # noqa: BLE001  (this request's fault reaches this request)
            self.stats.failed += 1
            req.on_event(("error", exc))
            return
        self._running[seq] = _Running(req, seq, stream)

    def _step(self) -> None:
        try:
            out = self.scheduler.step()
        except Exception as exc:  # noqa: BLE001  (a failed step fails every running request)
            for run in list(self._running.values()):
                self._fail(run, exc)
            self.scheduler.clear()
            return
        self.stats.steps, self.stats.max_batch_seen = self.scheduler.steps, self.scheduler.max_batch_seen
        while self.scheduler.failures:
            seq, exc = self.scheduler.failures.pop()
            if (run := self._running.get(seq)) is not None:
                self._fail(run, exc)
        for seq, token in out:
            run = self._running.get(seq)
            if run is None or run.req.cancelled.is_set():
                continue
            if delta := run.stream.push(token):
                run.req.on_event(("delta", delta))
            if run.stream.done or seq.finished:
                if delta := run.stream.finish():
                    run.req.on_event(("delta", delta))
                self._drop(run)
                run.req.on_event(("done", run.stream.completion))
                self.stats.completed += 1

    def _drop(self, run: _Running) -> None:
        self.scheduler.remove(run.seq)
        self._running.pop(run.seq, None)

    def _fail(self, run: _Running, exc: Exception) -> None:
        self._drop(run)
        self.stats.failed += 1
        if not run.req.cancelled.is_set():
            run.req.on_event(("error", exc))
