"""The continuous-batching engine (``dsvl2.serving.engine`` over ``.scheduler``), without HTTP.

Golden micro-mha checkpoint (random weights, real tokenizer), fp32 on CPU. Answers of requests that
join and leave a running batch equal each one's single run (``Pipeline.complete`` with the same
settings); a short request submitted after a long one finishes first; a cancelled request frees its
slot for a waiting one; a full queue refuses at once; requests of different sampling settings share
the batch, a seeded one keeping its single-run tokens.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest

import dsvl2
from dsvl2.processing.template import stop_strings
from dsvl2.serving.engine import Engine, EngineRequest, QueueFull

TIMEOUT = 60.0
PROMPTS = ["Write a haiku about the sea.", "Hi", "Name three colours and a number, please.", "What is 2 + 2?",
           "Tell me a long story about a dragon who learned to read."]


@pytest.fixture(scope="module")
def pipe(golden_dir: Path) -> dsvl2.Pipeline:
    return dsvl2.load(golden_dir / "checkpoints" / "micro-mha", dtype="fp32", device="cpu")


class Sink:
    finished: list[Sink] = []  # every sink, in the order its request finished

    def __init__(self) -> None:
        self.events: list[tuple[str, Any]] = []
        self.done = threading.Event()

    def __call__(self, event: tuple[str, Any]) -> None:
        self.events.append(event)
        if event[0] in ("done", "error"):
            Sink.finished.append(self)
            self.done.set()

    @property
    def text(self) -> str:
        assert self.events[-1][0] == "done", self.events[-1]
        deltas = "".join(v for k, v in self.events if k == "delta")
        assert deltas == self.events[-1][1].text  # the streamed pieces make up the answer
        return deltas


def _request(pipe: dsvl2.Pipeline, text: str, sink: Sink, **gen: Any) -> EngineRequest:
    conv = pipe.conversation(text)
    return EngineRequest(conv, pipe.prepare([conv]), dsvl2.GenerateArgs(**gen), _stops(pipe), sink)


def _stops(pipe: dsvl2.Pipeline) -> list[str]:
    return stop_strings(pipe.tokenizer.eos_token)


def _single(pipe: dsvl2.Pipeline, text: str, **gen: Any) -> str:
    return pipe.complete(text, stop=_stops(pipe), skip_special_tokens=False, **gen).text


def _wait(sinks: list[Sink]) -> None:
    for s in sinks:
        assert s.done.wait(TIMEOUT), "a request never finished"


def test_requests_joining_a_running_batch_equal_single_runs(pipe: dsvl2.Pipeline) -> None:
    engine = Engine(pipe, max_batch_size=3, max_queue=16, prefill_chunk=8)  # prompts span several chunks
    lengths = [40, 3, 17, 9, 25, 6]
    jobs = [(PROMPTS[i % len(PROMPTS)], n) for i, n in enumerate(lengths)]
    sinks = [Sink() for _ in jobs]
    seeded = Sink()
    engine.start()
    try:
        for (text, n), sink in zip(jobs, sinks):
            engine.submit(_request(pipe, text, sink, max_new_tokens=n))
            time.sleep(0.02)  # arrivals spread over the first steps of the others
        engine.submit(_request(pipe, PROMPTS[2], seeded, max_new_tokens=12, temperature=0.9, seed=7))
        _wait(sinks + [seeded])
    finally:
        engine.stop()
    for (text, n), sink in zip(jobs, sinks):
        assert sink.text == _single(pipe, text, max_new_tokens=n), (text, n)
    assert sum(len(s.text) for s in sinks) > 100  # real answers, not EOS at once
    assert seeded.text == _single(pipe, PROMPTS[2], max_new_tokens=12, temperature=0.9, seed=7)
    assert engine.stats.max_batch_seen == 3 and engine.stats.completed == len(jobs) + 1
    assert engine.stats.running == 0 and engine.stats.queued == 0 and engine.scheduler.free_slots == 3
    # continuous: the 3-token answer submitted second finished before the 40-token one submitted first
    assert sinks[1].events[-1][1].completion_tokens <= 3
    assert Sink.finished.index(sinks[1]) < Sink.finished.index(sinks[0])


def test_cancel_frees_the_slot_for_a_waiting_request(pipe: dsvl2.Pipeline) -> None:
    engine = Engine(pipe, max_batch_size=1, max_queue=4)
    long, short = Sink(), Sink()
    long_req = _request(pipe, PROMPTS[4], long, max_new_tokens=3000)
    engine.start()
    try:
        engine.submit(long_req)
        engine.submit(_request(pipe, PROMPTS[1], short, max_new_tokens=4))
        deadline = time.monotonic() + TIMEOUT
        while engine.stats.steps < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert engine.stats.queued == 1  # one slot: the short request waits
        long_req.cancel()
        _wait([short])
    finally:
        engine.stop()
    assert short.text == _single(pipe, PROMPTS[1], max_new_tokens=4)
    assert not long.done.is_set()  # a cancelled request gets no more events
    assert (engine.stats.cancelled, engine.stats.aborted, engine.stats.completed) == (1, 1, 1)


def test_a_failing_prompt_fails_alone(pipe: dsvl2.Pipeline, golden_dir: Path) -> None:
    engine = Engine(pipe, max_batch_size=2, max_queue=4)
    bad, good = Sink(), Sink()
    conv = pipe.conversation("What is shown?", images=[golden_dir / "images" / "tiny_20x20.png"])
    batch = pipe.prepare([conv])
    batch.images_seq_mask[0, batch.images_seq_mask[0].nonzero()[0]] = False  # one image position short
    engine.start()
    try:
        engine.submit(EngineRequest(conv, batch, dsvl2.GenerateArgs(4), _stops(pipe), bad))
        engine.submit(_request(pipe, PROMPTS[0], good, max_new_tokens=5))
        _wait([bad, good])
    finally:
        engine.stop()
    kind, exc = bad.events[-1]
    assert kind == "error" and isinstance(exc, dsvl2.errors.InputError) and "image positions" in str(exc)
    assert good.text == _single(pipe, PROMPTS[0], max_new_tokens=5)
    assert (engine.stats.failed, engine.stats.completed, engine.scheduler.free_slots) == (1, 1, 2)


def test_full_queue_refuses_at_once(pipe: dsvl2.Pipeline) -> None:
    engine = Engine(pipe, max_batch_size=1, max_queue=1)  # not started: nothing leaves the queue
    engine.submit(_request(pipe, "Hi", Sink()))
    with pytest.raises(QueueFull) as info:
        engine.submit(_request(pipe, "Hi", Sink()))
    assert info.value.retry_after >= 1
    engine.stop()


def test_box_constraint_runs_per_row_in_the_running_batch(pipe: dsvl2.Pipeline) -> None:
    """A request's logits processors (here: a forced ``<|det|>`` then the box grammar) act on its own row
    of the shared batch: each constrained answer equals its single run through ``generate`` and parses,
    while an unconstrained neighbour is untouched."""
    from test_constraints import BOX, ForceFirst

    original = pipe.processors
    pipe.processors = lambda a, b: [ForceFirst(pipe.tokenizer.det_id), *original(a, b)] if a.constrain_boxes else []
    try:
        jobs = [(PROMPTS[0], True, 20), (PROMPTS[3], False, 9), (PROMPTS[2], True, 14)]
        singles = [pipe.complete(t, stop=_stops(pipe), skip_special_tokens=False, max_new_tokens=n,
                                 constrain_boxes=c).text for t, c, n in jobs]
        engine = Engine(pipe, max_batch_size=3, max_queue=8)
        sinks = [Sink() for _ in jobs]
        engine.start()
        try:
            for (text, c, n), sink in zip(jobs, sinks):
                engine.submit(_request(pipe, text, sink, max_new_tokens=n, constrain_boxes=c))
            _wait(sinks)
        finally:
            engine.stop()
    finally:
        del pipe.processors
    assert [s.text for s in sinks] == singles
    assert BOX.match(singles[0]) and BOX.match(singles[2]) and not BOX.match(singles[1])
