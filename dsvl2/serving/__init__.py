"""HTTP serving: an OpenAI-compatible chat-completions server with a web chat page.

``create_app(pipe, ServeArgs())`` (:mod:`.app`) builds the FastAPI app over an
:class:`~.engine.Engine` (request queue + continuous-batching worker); :mod:`.protocol` holds the wire format.
FastAPI and uvicorn come with the ``serve`` extra (``pip install 'dsvl2[serve]'``); importing this
package does not import them, so :class:`ServeArgs` (the ``dsvl2 serve`` flags) is defined here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ServeArgs:
    """Server settings; ``dsvl2 serve`` flags are these fields (``--max-images`` ...)."""

    host: str = "127.0.0.1"  # loopback by default: exposing the server is an explicit choice
    port: int = 8000
    api_key: str | None = None  # also read from $DSVL2_API_KEY by the CLI
    model_name: str | None = None  # id in /v1/models; default: the model folder's name
    max_body_bytes: int = 32 * 2**20
    max_images: int = 8  # per request, over all messages
    max_image_pixels: int = 4096 * 4096
    max_context: int | None = None  # lower the model's context limit (prompt + max_tokens)
    default_max_tokens: int = 512
    max_batch_size: int = 8  # slots of the continuous batch
    max_queue: int = 64  # waiting requests beyond the slots; more are refused (503 + Retry-After)
    prefill_chunk: int = 512  # prompt tokens a newcomer prefills between two decode steps of the others
    no_cuda_graphs: bool = False  # decode eagerly on CUDA instead of replaying captured graphs
    allow_remote_images: bool = False  # fetch http(s) image URLs
    local_images: Path | None = None  # serve image paths under this folder
    chunk_size: int | None = None  # prefill chunk length (long prompts on small GPUs)
