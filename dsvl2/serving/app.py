"""The HTTP server: OpenAI-compatible routes, limits, API key and the web chat page.

``create_app(pipe, ServeArgs())`` returns a FastAPI app; ``dsvl2 serve`` runs it under uvicorn.
Routes: ``POST /v1/chat/completions`` (JSON or server-sent events), ``GET /v1/models``,
``GET /v1/models/{id}``, ``GET /health``, and the static page at ``/`` (files under ``/static``).

The app is a thin adapter over :class:`~dsvl2.serving.engine.Engine`: each request is parsed
(:mod:`.protocol`), its images decoded and its prompt prepared and checked in a worker thread, then
queued; the engine batches it continuously and streams events back. Every client mistake is answered with an
OpenAI error object: 400 (bad value, bad image, over-long prompt), 401 (API key), 404 (unknown
model or route), 413 (body or image too large), 422 (wrong JSON types), 503 (queue full, with
``Retry-After``; shutting down). Only a fault of the server itself is a 500.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from ..errors import ContextLengthError, InputError
from ..generation.generate import GenerateArgs
from ..model.ocr2 import DeepseekOCR2
from ..pipeline import Completion, Pipeline
from ..processing.template import stop_strings
from . import ServeArgs
from .engine import Engine, EngineRequest, EngineStopped, QueueFull
from .protocol import (
    APIError,
    ChatRequest,
    ImagePolicy,
    chunk_body,
    completion_body,
    grounding_entries,
    invalid,
    load_image_url,
    usage,
)

STATIC_DIR = Path(__file__).resolve().parent / "static"
log = logging.getLogger("dsvl2.serving")


class ApiKeyMiddleware:
    """Checks ``Authorization: Bearer KEY`` on every route except the static page itself.

    The page (``/`` and ``/static/...``) holds no data; it asks for the key and sends it with each
    API call, which a browser cannot do for the page request.
    """

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app, self.api_key = app, api_key.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or path == "/" or path.startswith("/static/"):
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        auth = headers.get(b"authorization", b"")
        token = auth[7:].strip() if auth[:7].lower() == b"bearer " else headers.get(b"x-api-key", b"")
        if token and hmac.compare_digest(token, self.api_key):
            await self.app(scope, receive, send)
            return
        message = "invalid API key" if token else "missing API key: send it as 'Authorization: Bearer <key>'"
        error = APIError(401, message, code="invalid_api_key")
        await JSONResponse(error.body(), 401, headers={"WWW-Authenticate": "Bearer"})(scope, receive, send)


@dataclass
class Prepared:
    """A validated request ready for the engine."""

    conversation: list[dict[str, Any]]
    image_sizes: list[tuple[int, int]]
    args: GenerateArgs
    stop: list[str]
    batch: Any


def create_app(pipe: Pipeline, args: ServeArgs | None = None) -> FastAPI:
    """The FastAPI app serving ``pipe``; the engine thread starts and stops with the app's lifespan."""
    args = args or ServeArgs()
    limit = pipe.model.cfg.language_config.max_position_embeddings
    context = min(limit, args.max_context or limit)
    engine = Engine(pipe, args.max_batch_size, args.max_queue, args.prefill_chunk, not args.no_cuda_graphs, context)
    model_id = args.model_name or (pipe.model_dir.name if pipe.model_dir else "dsvl2")
    policy = ImagePolicy(args.max_image_pixels, args.max_body_bytes, args.allow_remote_images, args.local_images)
    created = int(time.time())

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine.start()
        yield
        await run_in_threadpool(engine.stop)

    app = FastAPI(title="dsvl2", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine, app.state.args, app.state.model_id = engine, args, model_id
    if args.api_key:
        app.add_middleware(ApiKeyMiddleware, api_key=args.api_key)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body(), exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return JSONResponse(APIError(exc.status_code, str(exc.detail), code=code).body(), exc.status_code)

    @app.exception_handler(Exception)
    async def _server_error(request: Request, exc: Exception) -> JSONResponse:
        log.exception("internal error on %s", request.url.path)
        error = APIError(500, f"internal server error: {type(exc).__name__}", type="server_error")
        return JSONResponse(error.body(), 500)

    def model_card() -> dict[str, Any]:
        return {"id": model_id, "object": "model", "created": created, "owned_by": "dsvl2", "max_model_len": context}

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": model_id, "plan": pipe.plan.as_dict(), **asdict(engine.stats)}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str) -> dict[str, Any]:
        if name != model_id:
            raise APIError(404, f"the model {name!r} does not exist; this server serves {model_id!r}",
                           param="model", code="model_not_found")
        return model_card()

    @app.get("/")
    async def page() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    def prepare(req: ChatRequest) -> Prepared:
        """Decode images, build and tokenise the conversation, check the context (worker thread)."""
        messages, sizes = [], []
        for i, msg in enumerate(req.messages):
            images = [load_image_url(u, policy, f"messages[{i}].content") for u in msg.image_urls]
            sizes += [im.size for im in images]
            messages.append({"role": msg.role, "content": msg.text, "images": images})
        try:
            conversation, batch = pipe.fit(pipe.conversation(messages), req.image_token_budget, req.truncate, context)
        except ContextLengthError as exc:
            raise invalid(str(exc), "messages", "context_length_exceeded") from exc
        except InputError as exc:
            raise invalid(str(exc), "messages", "invalid_messages") from exc
        if req.truncate:  # the dropped turns' images are gone: box coordinates refer to the kept ones
            sizes = [im.size for m in conversation for im in m.get("images") or []]
        prompt = int(batch.input_ids.shape[1])
        if prompt >= context:
            raise invalid(f"this model's maximum context length is {context} tokens, but the messages are {prompt}"
                          " tokens", "messages", "context_length_exceeded")
        max_tokens = req.max_tokens or min(args.default_max_tokens, context - prompt)
        if prompt + max_tokens > context:
            raise invalid(f"this model's maximum context length is {context} tokens; you requested"
                          f" {prompt + max_tokens} ({prompt} in the messages, {max_tokens} in the completion)",
                          "max_tokens", "context_length_exceeded")
        try:
            # pipe.generate_args: OCR-2 models also get the no-repeat rule
            gen = pipe.generate_args(max_new_tokens=max_tokens, **asdict(req.sampling),
                                     chunk_size=args.chunk_size, constrain_boxes=req.constrain_boxes)
        except InputError as exc:
            raise invalid(str(exc), code="invalid_value") from exc
        return Prepared(conversation, sizes, gen, req.stop + stop_strings(pipe.tokenizer.eos_token), batch)

    if isinstance(pipe.model, DeepseekOCR2):
        from .ocr_route import add_ocr_route

        add_ocr_route(app, pipe, policy, model_id, args.max_body_bytes)

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(request: Request) -> Response:
        body = await _read_json(request, args.max_body_bytes)
        req = ChatRequest.from_json(body)
        if req.model is not None and req.model != model_id:
            raise APIError(404, f"the model {req.model!r} does not exist; this server serves {model_id!r}",
                           param="model", code="model_not_found")
        if len(req.image_urls) > args.max_images:
            raise invalid(f"{len(req.image_urls)} images in the request, over the limit of {args.max_images}",
                          "messages", "too_many_images")
        prep = await run_in_threadpool(prepare, req)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()

        def on_event(event: tuple[str, Any]) -> None:
            with contextlib.suppress(RuntimeError):  # the loop is gone at shutdown
                loop.call_soon_threadsafe(events.put_nowait, event)

        ereq = EngineRequest(prep.conversation, prep.batch, prep.args, prep.stop, on_event)
        try:
            engine.submit(ereq)
        except QueueFull as exc:
            error = APIError(503, f"the server is busy, retry later: {exc}", code="server_overloaded",
                             type="server_error")
            return JSONResponse(error.body(), 503, headers={"Retry-After": str(exc.retry_after)})
        except EngineStopped as exc:
            raise APIError(503, str(exc), code="server_shutting_down", type="server_error") from exc
        cid, now = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if req.stream:
            return StreamingResponse(_sse(events, ereq, cid, now, model_id, prep, req.include_usage, context),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        completion = await _wait_done(events, ereq, request)
        if completion is None:  # the client went away; nobody reads this
            return Response(status_code=499)
        grounding = grounding_entries(completion.text, prep.image_sizes)
        return JSONResponse(completion_body(cid, now, model_id, completion.text, completion.finish_reason, grounding,
                                            completion.prompt_tokens, completion.completion_tokens,
                                            completion.image_tokens, context))

    return app


async def _read_json(request: Request, limit: int) -> Any:
    """The body as JSON; 413 past ``limit`` bytes (the rest is drained so the client sees the answer)."""
    declared = request.headers.get("content-length", "")
    too_big = declared.isdigit() and int(declared) > limit
    data, size = bytearray(), 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            too_big = True
            if size > 8 * limit:
                break
        else:
            data += chunk
    if too_big:
        raise APIError(413, f"request body is over the limit of {limit} bytes", code="request_too_large")
    try:
        return json.loads(data)
    except ValueError as exc:
        raise invalid(f"the request body is not valid JSON: {exc}", code="invalid_json") from exc


def _engine_error(exc: Exception) -> APIError:
    if isinstance(exc, InputError):
        return invalid(str(exc), "messages", "invalid_messages")
    if isinstance(exc, EngineStopped):
        return APIError(503, str(exc), code="server_shutting_down", type="server_error")
    log.error("generation failed: %r", exc)
    return APIError(500, f"generation failed: {type(exc).__name__}: {exc}", type="server_error")


async def _wait_done(events: asyncio.Queue[tuple[str, Any]], ereq: EngineRequest,
                     request: Request) -> Completion | None:
    """Wait for the final Completion; cancel the request if the client disconnects first."""
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        while True:
            get = asyncio.ensure_future(events.get())
            await asyncio.wait({get, gone}, return_when=asyncio.FIRST_COMPLETED)
            if not get.done():
                get.cancel()
                ereq.cancel()
                return None
            kind, value = get.result()
            if kind == "done":
                return value
            if kind == "error":
                raise _engine_error(value)
    finally:
        gone.cancel()


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _sse(events: asyncio.Queue[tuple[str, Any]], ereq: EngineRequest, cid: str, created: int, model: str,
               prep: Prepared, include_usage: bool, context: int) -> AsyncIterator[str]:
    """Server-sent events in OpenAI's chunk format; leaving early (disconnect) cancels the request."""
    done = False

    def sse(body: dict[str, Any]) -> str:
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    try:
        yield sse(chunk_body(cid, created, model, {"role": "assistant", "content": ""}))
        while True:
            kind, value = await events.get()
            if kind == "delta":
                yield sse(chunk_body(cid, created, model, {"content": value}))
                continue
            done = True
            if kind == "error":
                yield sse(_engine_error(value).body())
                return
            delta: dict[str, Any] = {}
            grounding = grounding_entries(value.text, prep.image_sizes)
            if grounding:
                delta["grounding"] = grounding
            yield sse(chunk_body(cid, created, model, delta, value.finish_reason))
            if include_usage:
                counts = usage(value.prompt_tokens, value.completion_tokens, value.image_tokens, context)
                yield sse(chunk_body(cid, created, model, {}, usage_=counts, with_choice=False))
            yield "data: [DONE]\n\n"
            return
    finally:
        if not done:
            ereq.cancel()


@contextlib.contextmanager
def background_server(app: FastAPI, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """Run ``app`` under uvicorn in a thread (port 0: a free one); yield its base URL, then shut down.

    For notebooks and tests; ``dsvl2 serve`` runs uvicorn in the foreground instead.
    """
    import socket
    import threading

    import uvicorn

    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.bind((host, port))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="dsvl2-uvicorn", daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.01)
        bound_host, bound_port = sock.getsockname()[:2]
        yield f"http://{bound_host if ':' not in bound_host else f'[{bound_host}]'}:{bound_port}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()
