"""OpenAI-compatible chat-completion request parsing, image decoding and response bodies.

Follows the public OpenAI "Chat Completions" wire format (``POST /v1/chat/completions``): messages
with ``text`` / ``image_url`` content parts, SSE chunks ending in ``data: [DONE]``, ``usage``, and
error bodies ``{"error": {"message", "type", "param", "code"}}``. Everything a client can get wrong
raises :class:`APIError` with the status and code the server returns (never a 500).

dsvl2 extensions (documented in docs/serving.md): the request may carry ``top_k``,
``repetition_penalty``, ``constrain_boxes`` (default true: ``<|det|>`` spans follow the box grammar),
``image_token_budget`` (tile layouts fitted to that many image tokens) and ``truncate: "oldest"``;
``usage`` also reports ``image_tokens`` (per image), ``context_limit`` and ``context_remaining``;
an answer with ``<|det|>`` boxes carries ``message.grounding`` (stream: the last chunk's
``delta.grounding``), a list of :func:`grounding_entries`. Images are placed before the
text of their turn (``"<image>\\n"`` per image, as the official web demo and vLLM do) unless the text
holds its own ``<image>`` placeholders.
"""

from __future__ import annotations

import base64
import binascii
import io
import math
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from ..errors import DSVL2Error
from ..generation.sampling import SamplingParams
from ..processing.grounding import parse_grounding

ROLES = ("system", "user", "assistant")
# set to a non-default value, these OpenAI fields ask for something dsvl2 cannot do
UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "tools": (None, []), "functions": (None, []), "logprobs": (None, False), "top_logprobs": (None, 0),
    "response_format": (None, {"type": "text"}), "audio": (None,), "prediction": (None,),
}


class APIError(DSVL2Error):
    """A request that cannot be served (status 4xx: the client's mistake, 5xx: the server's state);
    ``body()`` is the OpenAI error object."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def invalid(message: str, param: str | None = None, code: str | None = None, status: int = 400) -> APIError:
    return APIError(status, message, param=param, code=code)


@dataclass
class ChatMessage:
    """One turn: its role, its text parts joined by newlines, and the URLs of its images."""

    role: str
    text: str
    image_urls: list[str] = field(default_factory=list)


@dataclass
class ChatRequest:
    """The fields of a chat-completion request that dsvl2 honours, validated."""

    messages: list[ChatMessage]
    model: str | None = None
    stream: bool = False
    include_usage: bool = False
    max_tokens: int | None = None
    sampling: SamplingParams = field(default_factory=SamplingParams)  # temperature, top_p, top_k, ..., seed
    stop: list[str] = field(default_factory=list)
    constrain_boxes: bool = True  # dsvl2 extension: <|det|> spans kept to the box grammar
    image_token_budget: int | None = None  # dsvl2 extension: tile layouts chosen to fit this many image tokens
    truncate: str | None = None  # dsvl2 extension: "oldest" drops the oldest turns that do not fit

    @property
    def image_urls(self) -> list[str]:
        return [u for m in self.messages for u in m.image_urls]

    @classmethod
    def from_json(cls, body: Any) -> ChatRequest:
        """Validate a decoded JSON body. Wrong types -> 422, unsupported values -> 400."""
        if not isinstance(body, dict):
            raise invalid("the request body must be a JSON object", status=422, code="invalid_type")
        for key, accepted in UNSUPPORTED.items():
            if body.get(key) not in accepted:
                raise invalid(f"{key!r} is not supported by this server", key, "unsupported_parameter")
        if _number(body, "n", int, 1) != 1:
            raise invalid("only n = 1 is supported", "n", "unsupported_parameter")
        model = body.get("model")
        if model is not None and not isinstance(model, str):
            raise invalid("'model' must be a string", "model", "invalid_type", 422)
        stream_options = body.get("stream_options") or {}
        if not isinstance(stream_options, dict):
            raise invalid("'stream_options' must be an object", "stream_options", "invalid_type", 422)
        max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
        req = cls(
            messages=_messages(body.get("messages")),
            model=model,
            stream=_flag(body, "stream"),
            include_usage=bool(stream_options.get("include_usage", False)),
            max_tokens=None if max_tokens is None else _number({"max_tokens": max_tokens}, "max_tokens", int, 0),
            sampling=_sampling(body),
            stop=_stop(body.get("stop")),
            constrain_boxes=_flag(body, "constrain_boxes", True),
            image_token_budget=(None if body.get("image_token_budget") is None
                                else _number(body, "image_token_budget", int, 0)),
            truncate=body.get("truncate"),
        )
        if req.image_token_budget is not None and req.image_token_budget < 1:
            raise invalid("image_token_budget must be at least 1", "image_token_budget", "invalid_value")
        if req.truncate not in (None, "oldest"):
            raise invalid(f"truncate must be 'oldest' or absent, got {req.truncate!r}"[:200], "truncate",
                          "invalid_value")
        if req.max_tokens is not None and req.max_tokens < 1:
            raise invalid("max_tokens must be at least 1", "max_tokens", "invalid_value")
        return req


def _sampling(body: dict[str, Any]) -> SamplingParams:
    """JSON types here (422); the values' rules are SamplingParams' (400, naming the field)."""
    kinds = {"temperature": float, "top_p": float, "top_k": int, "repetition_penalty": float, "seed": int}
    values = {key: _number(body, key, kind, 0) for key, kind in kinds.items() if body.get(key) is not None}
    problem = SamplingParams.problem(values)
    if problem is not None:
        raise invalid(problem[1], problem[0], "invalid_value")
    sampling = SamplingParams(**values)
    if sampling.temperature > 2:  # the OpenAI API's range is [0, 2]
        raise invalid(f"temperature must be between 0 and 2, got {sampling.temperature}", "temperature",
                      "invalid_value")
    return sampling


def _flag(body: dict[str, Any], key: str, default: bool = False) -> bool:
    value = body.get(key, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise invalid(f"{key!r} must be a boolean", key, "invalid_type", 422)
    return value


def _number(body: dict[str, Any], key: str, kind: type, default: float) -> Any:
    value = body.get(key)
    if value is None:
        return default
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or (kind is int and value != int(value)):
        raise invalid(f"{key!r} must be {'an integer' if kind is int else 'a number'}, got {value!r}"[:200],
                      key, "invalid_type", 422)
    return kind(value)


def _stop(value: Any) -> list[str]:
    if value is None:
        return []
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise invalid("'stop' must be a non-empty string or a list of them", "stop", "invalid_type", 422)
    if len(stops) > 4:
        raise invalid("'stop' takes at most 4 sequences", "stop", "invalid_value")
    return stops


def _messages(value: Any) -> list[ChatMessage]:
    if not isinstance(value, list) or not value:
        raise invalid("'messages' must be a non-empty list", "messages", "invalid_type", 422)
    out = []
    for i, msg in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(msg, dict):
            raise invalid(f"{where} must be an object", where, "invalid_type", 422)
        role = msg.get("role")
        if role == "developer":  # the newer OpenAI name of the system role
            role = "system"
        if role not in ROLES:
            raise invalid(f"{where}.role must be one of {list(ROLES)}, got {role!r}"[:200], f"{where}.role",
                          "invalid_value")
        texts, urls = _content(msg.get("content"), f"{where}.content")
        if urls and role != "user":
            raise invalid(f"{where}: images are only allowed in user messages", f"{where}.content", "invalid_value")
        out.append(ChatMessage(role, "\n".join(texts), urls))
    return out


def _content(content: Any, where: str) -> tuple[list[str], list[str]]:
    if content is None:
        return [], []
    if isinstance(content, str):
        return [content], []
    if not isinstance(content, list):
        raise invalid(f"{where} must be a string or a list of content parts", where, "invalid_type", 422)
    texts, urls = [], []
    for j, part in enumerate(content):
        p = f"{where}[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind == "image_url":
            image = part.get("image_url")
            url = image.get("url") if isinstance(image, dict) else image
            if not isinstance(url, str) or not url:
                raise invalid(f"{p}.image_url.url must be a non-empty string", f"{p}.image_url", "invalid_type", 422)
            urls.append(url)
        else:
            raise invalid(f"{p} must be a 'text' part with a string or an 'image_url' part", p, "invalid_type", 422)
    return texts, urls


# ---- images ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ImagePolicy:
    """What image sources a request may use and how large an image may be."""

    max_pixels: int = 4096 * 4096
    max_bytes: int = 20 * 2**20
    allow_remote: bool = False  # http(s) URLs, fetched by the server
    local_dir: Path | None = None  # file paths / file:// URLs under this folder
    timeout_s: float = 10.0
    # past ~768:1 the tiler's global view rounds the short side to 0 pixels (Pillow then raises)
    max_aspect_ratio: float = 100.0


def load_image_url(url: str, policy: ImagePolicy, param: str) -> Image.Image:
    """Decode an ``image_url``: a base64 ``data:`` URL, or (when the policy allows) http(s) / a path."""
    if url.startswith("data:"):
        header, sep, payload = url[5:].partition(",")
        if not sep or not header.endswith(";base64"):
            raise invalid("image data URLs must look like data:image/png;base64,<data>", param, "invalid_image_url")
        try:
            raw = base64.b64decode("".join(payload.split()), validate=True)
        except (binascii.Error, ValueError) as exc:
            raise invalid(f"the image data URL is not valid base64: {exc}", param, "invalid_base64") from exc
    elif url.startswith(("http://", "https://")):
        if not policy.allow_remote:
            raise invalid("http(s) image URLs are disabled on this server (start it with --allow-remote-images);"
                          " send the image as a base64 data: URL", param, "image_url_not_allowed")
        raw = _fetch(url, policy, param)
    else:
        raw = _read_local(url, policy, param)
    if len(raw) > policy.max_bytes:
        raise invalid(f"image is {len(raw)} bytes, over the limit of {policy.max_bytes}", param, "image_too_large", 413)
    return _decode(raw, policy, param)


def _fetch(url: str, policy: ImagePolicy, param: str) -> bytes:
    try:
        with urllib.request.urlopen(url, timeout=policy.timeout_s) as response:  # scheme checked above
            return response.read(policy.max_bytes + 1)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise invalid(f"could not fetch image {url[:100]}: {exc}", param, "image_fetch_failed") from exc


def _read_local(url: str, policy: ImagePolicy, param: str) -> bytes:
    if policy.local_dir is None:
        raise invalid("image_url must be a base64 data: URL (local paths are disabled on this server; start it"
                      " with --local-images DIR)", param, "image_url_not_allowed")
    root = policy.local_dir.resolve()
    path = Path(url.removeprefix("file://"))
    path = (path if path.is_absolute() else root / path).resolve()
    if not path.is_relative_to(root) or not path.is_file():
        raise invalid(f"no image file {url[:200]!r} under the allowed folder", param, "image_not_found")
    if path.stat().st_size > policy.max_bytes:
        raise invalid(f"image file is over the limit of {policy.max_bytes} bytes", param, "image_too_large", 413)
    return path.read_bytes()


def _decode(raw: bytes, policy: ImagePolicy, param: str) -> Image.Image:
    try:
        with Image.open(io.BytesIO(raw)) as img:
            if img.width * img.height > policy.max_pixels:
                raise invalid(f"image is {img.width}x{img.height} = {img.width * img.height} pixels, over the limit"
                              f" of {policy.max_pixels}", param, "image_too_large", 413)
            if img.width == 0 or img.height == 0:
                raise invalid("image has zero size", param, "invalid_image")
            if max(img.size) > policy.max_aspect_ratio * min(img.size):
                raise invalid(f"image is {img.width}x{img.height}; sides more unequal than"
                              f" {policy.max_aspect_ratio:g}:1 are refused", param, "invalid_image")
            return img.convert("RGB")  # full decode: a truncated file fails here
    except Image.DecompressionBombError as exc:
        raise invalid(f"image is too large: {exc}", param, "image_too_large", 413) from exc
    except (OSError, ValueError, SyntaxError) as exc:
        raise invalid(f"the image data is not a readable image: {exc}"[:300], param, "invalid_image") from exc


# ---- responses -----------------------------------------------------------------------------------
def grounding_entries(text: str, image_sizes: list[tuple[int, int]]) -> list[dict[str, Any]]:
    """``<|det|>`` boxes of ``text`` as ``{"label", "box", "box_999", "image_index"}``.

    Boxes refer to the LAST image of the conversation (spec 9.2; in-context grounding asks about the
    second image), so ``image_index`` is its 0-based index over all images of the request and ``box``
    its pixel corners ``[x1, y1, x2, y2]`` (``Box.to_pixels``); with no image both are ``None``.
    """
    index = len(image_sizes) - 1 if image_sizes else None
    out = []
    for box in parse_grounding(text).boxes:
        pixels = list(box.to_pixels(*image_sizes[-1])) if image_sizes else None
        out.append({"label": box.label, "box": pixels, "box_999": [box.x1, box.y1, box.x2, box.y2],
                    "image_index": index})
    return out


def usage(prompt_tokens: int, completion_tokens: int, image_tokens: list[int] | None = None,
          context_limit: int | None = None) -> dict[str, Any]:
    """OpenAI's usage object, plus (dsvl2) the tokens each image took and the context left."""
    out: dict[str, Any] = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                           "total_tokens": prompt_tokens + completion_tokens}
    if image_tokens is not None:
        out["image_tokens"] = list(image_tokens)
    if context_limit is not None:
        out["context_limit"] = context_limit
        out["context_remaining"] = context_limit - prompt_tokens - completion_tokens
    return out


def completion_body(cid: str, created: int, model: str, text: str, finish_reason: str,
                    grounding: list[dict[str, Any]], prompt_tokens: int, completion_tokens: int,
                    image_tokens: list[int] | None = None, context_limit: int | None = None) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": text}
    if grounding:
        message["grounding"] = grounding
    return {"id": cid, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": message, "finish_reason": finish_reason, "logprobs": None}],
            "usage": usage(prompt_tokens, completion_tokens, image_tokens, context_limit)}


def chunk_body(cid: str, created: int, model: str, delta: dict[str, Any], finish_reason: str | None = None,
               usage_: dict[str, int] | None = None, with_choice: bool = True) -> dict[str, Any]:
    choices = [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}] if with_choice else []
    body: dict[str, Any] = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                            "choices": choices}
    if usage_ is not None:
        body["usage"] = usage_
    return body
