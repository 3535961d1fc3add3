"""``dsvl2 serve``: load the model and serve it (OpenAI-compatible HTTP API + web chat) with uvicorn.

A thin layer over :func:`dsvl2.serving.app.create_app`; one flag per :class:`~dsvl2.serving.ServeArgs`
field, whose help text is written next to the field. FastAPI and uvicorn come with the ``serve`` extra.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path

from ..errors import EXIT_FAILURE, DSVL2Error
from . import set_examples
from .loading import add_model_arguments, fail, load_pipeline

EXAMPLES = ("dsvl2 serve --model ./deepseek-vl2-tiny --port 8000   # OpenAI API + web chat on http://127.0.0.1:8000/",)


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``dsvl2 serve``: the model flags plus one per :class:`ServeArgs` field."""
    from ..serving import ServeArgs  # FastAPI itself is imported by serve_main

    set_examples(parser, EXAMPLES)
    add_model_arguments(parser)
    for f in dataclasses.fields(ServeArgs):
        flag = "--" + f.name.replace("_", "-")
        if f.type in ("bool", bool):
            parser.add_argument(flag, action="store_true", help=f.metadata["help"])
            continue
        kind = {"int": int, "float": float, "str": str}.get(str(f.type).split(" ")[0], str)
        if "Path" in str(f.type):
            kind = Path
        default = os.environ.get("DSVL2_API_KEY") if f.name == "api_key" else f.default
        shown = "" if f.default is None else f" (default: {f.default})"
        parser.add_argument(flag, type=kind, default=default, help=f.metadata["help"] + shown)


def serve_main(args: argparse.Namespace) -> int:
    """Load the model and serve it with uvicorn until interrupted."""
    from ..serving import ServeArgs

    try:
        import uvicorn

        from ..serving.app import create_app
    except ImportError as exc:
        return fail(f"{exc.name} is missing; install the server extra: pip install 'dsvl2[serve]'", EXIT_FAILURE)

    serve = ServeArgs(**{f.name: getattr(args, f.name) for f in dataclasses.fields(ServeArgs)})
    if serve.host not in ("127.0.0.1", "localhost", "::1") and not serve.api_key:
        print(f"warning: serving on {serve.host} without --api-key: anyone who can reach it can use it",
              file=sys.stderr)
    try:
        pipe = load_pipeline(args)
    except DSVL2Error as exc:
        return fail(str(exc))
    app = create_app(pipe, serve)
    print(f"dsvl2: serving {app.state.model_id} on http://{serve.host}:{serve.port}/ (chat page at /, API at /v1)",
          file=sys.stderr)
    uvicorn.run(app, host=serve.host, port=serve.port, log_level="info", timeout_graceful_shutdown=10)
    return 0
