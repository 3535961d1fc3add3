"""HTTP serving: an OpenAI-compatible chat-completions server with a web chat page.

``create_app(pipe, ServeArgs())`` (:mod:`.app`) builds the FastAPI app over an
:class:`~.engine.Engine` (request queue + continuous-batching worker); :mod:`.protocol` holds the wire format.
FastAPI and uvicorn come with the ``serve`` extra (``pip install 'dsvl2[serve]'``); importing this
package does not import them, so :class:`ServeArgs` (the ``dsvl2 serve`` flags) is defined here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


def _flag(default: object, help: str) -> object:
    """A field with the ``dsvl2 serve --help`` text of its flag (dsvl2/cli/serve.py reads it)."""
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class ServeArgs:
    """Server settings; ``dsvl2 serve`` flags are these fields (``--max-images`` ...), with these help texts."""

    host: str = _flag("127.0.0.1", "address to bind; loopback by default (use 0.0.0.0 only with --api-key)")
    port: int = _flag(8000, "TCP port")
    api_key: str | None = _flag(None,
                                "require 'Authorization: Bearer KEY' on every API route (default: $DSVL2_API_KEY)")
    model_name: str | None = _flag(None, "model id reported by /v1/models (default: the model folder's name)")
    max_body_bytes: int = _flag(32 * 2**20, "largest accepted request body, in bytes (413 above)")
    max_images: int = _flag(8, "most images per request (400 above)")
    max_image_pixels: int = _flag(4096 * 4096, "largest image, width x height (413 above)")
    max_context: int | None = _flag(None, "lower the context limit (prompt + max_tokens) below the model's")
    default_max_tokens: int = _flag(512, "max_tokens when a request gives none")
    max_batch_size: int = _flag(8, "most requests decoded together (slots of the continuous batch)")
    max_queue: int = _flag(64, "most waiting requests beyond the slots (503 with Retry-After above)")
    prefill_chunk: int = _flag(512,
                               "prompt tokens a newcomer prefills between two decode steps of the running requests")
    no_cuda_graphs: bool = _flag(False,
                                 "on CUDA, decode eagerly instead of replaying a captured CUDA graph per batch size")
    allow_remote_images: bool = _flag(False, "let requests name http(s) image URLs, fetched by the server")
    local_images: Path | None = _flag(None, "let requests name image files under this folder (paths or file:// URLs)")
    chunk_size: int | None = _flag(None, "prefill chunk length for long prompts (saves GPU memory)")
