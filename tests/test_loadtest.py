"""The CI-size load test (bench/loadtest.py): 32 concurrent streaming clients on the shipped demo model.

fp32 on CPU, 8 slots, answers of 4-24 tokens, a fifth of the clients leaving early. Every request is
either answered or cancelled (0 failures), every greedy answer equals its single run, and afterwards
the server is alive with an empty queue and no running request.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="needs the serve extra (fastapi)")
httpx = pytest.importorskip("httpx", reason="needs the test extra (httpx)")

import dsvl2

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import loadtest  # noqa: E402


def test_32_concurrent_streams_on_the_demo_model() -> None:
    pipe = dsvl2.load(dtype="fp32", device="cpu")
    report = loadtest.run(pipe, requests=32, clients=32, max_batch_size=8, max_tokens=(4, 24), cancel=0.2,
                          cancel_after=(0, 1), timeout=60, deadline=60, check=True)
    assert report["failures"] == 0, report["failure_examples"]
    assert report["mismatches"] == [] and report["checked"] == report["completed"] >= 20
    health = report["health_after"]
    assert health["status"] == "ok" and health["queued"] == 0 and health["running"] == 0
    assert health["completed"] + health["cancelled"] == 32 and health["failed"] == 0
    assert health["max_batch_seen"] > 1  # requests really shared decode steps
    assert report["output_tokens"] > 0 and report["ttft_p99_s"] is not None
