"""The client side of bench/loadtest.py: streaming chat requests from threads, in a process of its own.

Kept apart (httpx and the standard library only) so that the clients run in a child process and do
not compete with the server for its interpreter lock.
"""

from __future__ import annotations

import base64
import json
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

EXAMPLES = Path(__file__).resolve().parents[1] / "dsvl2" / "demo" / "examples"


@dataclass
class Job:
    """One planned request and what its client saw."""

    index: int
    question: str
    image: str | None  # a demo example's file name
    max_tokens: int
    cancel_after: int | None  # close the stream after this many content chunks (0: after the role chunk)
    status: str = "pending"  # ok | cancelled | failed
    error: str = ""
    text: str = ""
    tokens: int = 0
    ttft: float | None = None
    gaps: list[float] = field(default_factory=list)

    def body(self) -> dict[str, Any]:
        content: list[dict[str, Any]] = [{"type": "text", "text": self.question}]
        if self.image:
            data = base64.b64encode((EXAMPLES / self.image).read_bytes()).decode()
            content.append({"type": "image_url", "image_url": {"url": "data:image/png;base64," + data}})
        return {"messages": [{"role": "user", "content": content}], "max_tokens": self.max_tokens, "stream": True,
                "stream_options": {"include_usage": True}}

    def messages(self) -> list[dict[str, Any]]:
        images = [EXAMPLES / self.image] if self.image else []
        return [{"role": "user", "content": self.question, "images": images}]


def run_client(base: str, job: Job, timeout: float) -> None:
    t0 = time.perf_counter()
    last = None
    chunks = 0
    try:
        with httpx.stream("POST", base + "/v1/chat/completions", json=job.body(), timeout=timeout) as r:
            if r.status_code != 200:
                r.read()
                job.status, job.error = "failed", f"HTTP {r.status_code}: {r.text[:200]}"
                return
            for line in r.iter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    job.status = "ok"
                    return
                event = json.loads(data)
                if "error" in event:
                    job.status, job.error = "failed", json.dumps(event["error"])[:200]
                    return
                if event.get("usage"):
                    job.tokens = event["usage"]["completion_tokens"]
                for choice in event.get("choices", []):
                    piece = choice.get("delta", {}).get("content")
                    if piece:
                        now = time.perf_counter()
                        if last is None:
                            job.ttft = now - t0
                        else:
                            job.gaps.append(now - last)
                        last = now
                        job.text += piece
                        chunks += 1
                if job.cancel_after is not None and chunks >= job.cancel_after:
                    job.status = "cancelled"  # leaving the with-block closes the connection
                    return
            job.status, job.error = "failed", "stream ended without [DONE]"
    except httpx.HTTPError as exc:
        job.status, job.error = "failed", f"{type(exc).__name__}: {exc}"


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q / 100 * (len(s) - 1))))]


def run_clients(base: str, jobs: list[Job], clients: int, timeout: float, deadline: float) -> tuple[list[Job], float]:
    """Run ``jobs`` from ``clients`` threads (no request starts after ``deadline`` s); the jobs and the wall time."""
    pending = list(jobs)
    lock = threading.Lock()
    stop_at = time.monotonic() + deadline

    def worker() -> None:
        while time.monotonic() < stop_at:
            with lock:
                if not pending:
                    return
                job = pending.pop(0)
            run_client(base, job, timeout)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker, daemon=True) for _ in range(min(clients, len(jobs)))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(max(0.0, stop_at - time.monotonic()) + timeout)
    return jobs, time.perf_counter() - t0
