"""Load test of ``dsvl2 serve``: concurrent streaming clients over loopback against a live server.

    python bench/loadtest.py                                   # the shipped demo model, CPU, 64 requests
    python bench/loadtest.py --model /work/ckpt/tiny --device cuda --dtype bf16 --requests 256 --clients 64 \\
        --max-batch-size 64 --json out.json
    python bench/loadtest.py --preset tiny --device cuda --requests 256 --clients 64 --max-batch-size 64

Starts the server in this process (``create_app`` + ``background_server`` on 127.0.0.1, a free port:
nothing else is reachable) and runs ``--requests`` chat requests from ``--clients`` threads, each a
streaming client (httpx). Requests mix prompt lengths (text only, or with one of the demo images) and
answer lengths (``max_tokens`` drawn from ``--max-tokens LO,HI``); a ``--cancel`` fraction asks for a
long answer and closes its stream after ``--cancel-after LO,HI`` content chunks (0: right after the
role chunk, usually while queued; the server must drop it or free its slot). Everything is bounded: at most
``--clients`` connections, a per-request timeout and an overall ``--deadline``.

Prints (and ``--json`` writes): requests/s and output tokens/s of the completed requests over the
wall time; TTFT p50/p99 (request sent -> first content chunk); inter-token latency p50/p99 (gaps
between content chunks; one chunk per token except where text is held back for stop strings);
failures (non-200, an error event, no ``[DONE]``, timeout); the engine's offline throughput on the
same uncancelled requests (all submitted at once to an ``Engine``, no HTTP) and the ratio; the
server's ``/health`` afterwards. ``--check`` also runs every completed greedy request alone
(``Pipeline.complete``) and counts answers that differ. Exit status 1 on failures or mismatches.

On a shared machine the numbers drift with other processes: the load average is printed.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import multiprocessing
import os
import random
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import torch

import dsvl2
from dsvl2.demo import MODEL_DIR
from dsvl2.processing.template import stop_strings
from dsvl2.serving import ServeArgs
from dsvl2.serving.app import background_server, create_app
from dsvl2.serving.engine import Engine, EngineRequest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from load_clients import EXAMPLES, Job, percentile, run_clients  # noqa: E402

QUESTIONS = ["What is the value of bar D?", "Which bar is the tallest?", "Describe the picture.",
             "Where is the red square?", "Read the word in the image.", "How many shapes are there?",
             "Write a short story about a chart that wanted to be a map, with three characters.", "Hi"]


def plan(n: int, max_tokens: tuple[int, int], cancel: float, seed: int,
         cancel_after: tuple[int, int] = (0, 3)) -> list[Job]:
    rng = random.Random(seed)
    images = sorted(p.name for p in EXAMPLES.glob("*.png"))
    jobs = []
    for i in range(n):
        image = rng.choice(images) if rng.random() < 0.5 else None
        if rng.random() < cancel:  # asks for a long answer, left after 0 (the role chunk) to 3 content chunks
            jobs.append(Job(i, QUESTIONS[-2], None, 8 * max_tokens[1], rng.randint(*cancel_after)))
        else:
            jobs.append(Job(i, rng.choice(QUESTIONS), image, rng.randint(*max_tokens), None))
    return jobs


def offline_throughput(pipe: dsvl2.Pipeline, jobs: list[Job], slots: int, graphs: bool) -> dict[str, float]:
    """Output tokens/s of the same requests submitted at once to an Engine (no HTTP, no cancellation)."""
    engine = Engine(pipe, max_batch_size=slots, max_queue=len(jobs) + 1, cuda_graphs=graphs)
    stops = stop_strings(pipe.tokenizer.eos_token)
    done = threading.Semaphore(0)
    tokens = [0]

    def sink(event: tuple[str, Any]) -> None:
        if event[0] == "done":
            tokens[0] += event[1].completion_tokens
        if event[0] in ("done", "error"):
            done.release()

    reqs = []
    for job in jobs:
        conv = pipe.conversation(job.messages())
        reqs.append(EngineRequest(conv, pipe.prepare([conv]), dsvl2.GenerateArgs(job.max_tokens), stops, sink))
    engine.start()
    t0 = time.perf_counter()
    for req in reqs:
        engine.submit(req)
    for _ in reqs:
        done.acquire()
    wall = time.perf_counter() - t0
    engine.stop()
    return {"requests": len(reqs), "output_tokens": tokens[0], "wall_s": wall, "tok_s": tokens[0] / wall}


def run(pipe: dsvl2.Pipeline, requests: int = 64, clients: int = 16, max_batch_size: int = 16,
        max_tokens: tuple[int, int] = (4, 48), cancel: float = 0.1, seed: int = 0, timeout: float = 120.0,
        deadline: float = 600.0, check: bool = False, graphs: bool = True, offline: bool = True,
        cancel_after: tuple[int, int] = (0, 3)) -> dict[str, Any]:
    """The whole load test; returns the report (see the module docstring)."""
    jobs = plan(requests, max_tokens, cancel, seed, cancel_after)
    args = ServeArgs(max_batch_size=max_batch_size, max_queue=requests, default_max_tokens=max_tokens[1],
                     no_cuda_graphs=not graphs)
    report: dict[str, Any] = {"requests": requests, "clients": clients, "max_batch_size": max_batch_size,
                              "load_before": os.getloadavg()}
    with background_server(create_app(pipe, args)) as base:
        spawn = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(1, mp_context=spawn) as pool:
            jobs, wall = pool.submit(run_clients, base, jobs, clients, timeout, deadline).result()
        health_deadline = time.monotonic() + 30  # cancelled streams are noticed at the next step
        health = httpx.get(base + "/health", timeout=10).json()
        while (health["running"] or health["queued"]) and time.monotonic() < health_deadline:
            time.sleep(0.05)
            health = httpx.get(base + "/health", timeout=10).json()
    ok = [j for j in jobs if j.status == "ok"]
    failed = [j for j in jobs if j.status not in ("ok", "cancelled")]
    out_tokens = sum(j.tokens for j in ok)
    ttft = [j.ttft for j in jobs if j.ttft is not None]
    gaps = [g for j in ok for g in j.gaps]
    report.update({
        "completed": len(ok), "cancelled": sum(j.status == "cancelled" for j in jobs), "failures": len(failed),
        "failure_examples": [f"#{j.index}: {j.status} {j.error}" for j in failed[:5]],
        "wall_s": wall, "requests_per_s": len(ok) / wall, "output_tokens": out_tokens,
        "output_tok_s": out_tokens / wall,
        "ttft_p50_s": percentile(ttft, 50), "ttft_p99_s": percentile(ttft, 99),
        "itl_p50_s": percentile(gaps, 50), "itl_p99_s": percentile(gaps, 99), "health_after": health,
    })
    if offline:
        uncancelled = [j for j in jobs if j.cancel_after is None]
        report["offline"] = offline_throughput(pipe, uncancelled, max_batch_size, graphs)
        report["server_vs_offline"] = report["output_tok_s"] / report["offline"]["tok_s"]
    if check:
        stops = stop_strings(pipe.tokenizer.eos_token)
        # the server's defaults: special tokens kept, <|det|> spans held to the box grammar
        wrong = [j.index for j in ok if j.text != pipe.complete(j.messages(), stop=stops, skip_special_tokens=False,
                                                               max_new_tokens=j.max_tokens, constrain_boxes=True).text]
        report["checked"], report["mismatches"] = len(ok), wrong
    report["load_after"] = os.getloadavg()
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default=str(MODEL_DIR), help="model directory (default: the shipped demo model)")
    p.add_argument("--preset", default=None, help="instead: random weights of this preset built on the device")
    p.add_argument("--layers", type=int, default=None, help="with --preset: that many language-model layers")
    p.add_argument("--tokenizer-from", type=Path, default=None, help="with --preset: as bench/decode.py")
    p.add_argument("--dtype", default="bf16")
    p.add_argument("--device", default=None)
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--clients", type=int, default=16, help="concurrent streaming clients")
    p.add_argument("--max-batch-size", type=int, default=16, help="the server's slots")
    p.add_argument("--max-tokens", default="4,48", help="answer lengths drawn from LO,HI")
    p.add_argument("--cancel", type=float, default=0.1, help="fraction of requests cancelled mid-stream")
    p.add_argument("--cancel-after", default="0,3", help="content chunks LO,HI a cancelled client reads first")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=120.0, help="per request, seconds")
    p.add_argument("--deadline", type=float, default=600.0, help="no request starts after this many seconds")
    p.add_argument("--check", action="store_true", help="compare each greedy answer with its single run")
    p.add_argument("--no-cuda-graphs", action="store_true")
    p.add_argument("--no-offline", action="store_true", help="skip the offline engine throughput")
    p.add_argument("--json", type=Path)
    a = p.parse_args(argv)
    lo, hi = (int(x) for x in a.max_tokens.split(","))
    if a.preset:  # random answers rarely end early: every request runs to its max_tokens
        from decode import random_pipeline

        device = torch.device(a.device or dsvl2.pipeline.default_device())
        dtype = dsvl2.pipeline.resolve_dtype(a.dtype)
        pipe = random_pipeline(a.preset, a.layers, dtype, device, a.tokenizer_from, None)
        a.model = f"random:{a.preset}" + (f"(layers={a.layers})" if a.layers else "")
    else:
        pipe = dsvl2.load(a.model, dtype=a.dtype, device=a.device)
    print(f"model {a.model} ({a.dtype}, {pipe.model.device}); torch threads {torch.get_num_threads()}",
          file=sys.stderr)
    report = {"model": a.model, "dtype": a.dtype, "device": str(pipe.model.device)}
    report |= run(pipe, a.requests, a.clients, a.max_batch_size, (lo, hi), a.cancel, a.seed, a.timeout, a.deadline,
                 a.check, not a.no_cuda_graphs, not a.no_offline, tuple(int(x) for x in a.cancel_after.split(",")))
    print(json.dumps(report, indent=1))
    if a.json:
        a.json.write_text(json.dumps(report, indent=1))
    return 1 if report["failures"] or report.get("mismatches") else 0


if __name__ == "__main__":
    sys.exit(main())
