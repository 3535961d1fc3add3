"""HTTP serving: an OpenAI-compatible chat-completions server with a web chat page.

``create_app(pipe, ServeArgs())`` (:mod:`.app`) builds the FastAPI app over an
:class:`~.engine.Engine` (request queue + batching worker); :mod:`.protocol` holds the wire format.
FastAPI and uvicorn come with the ``serve`` extra (``pip install 'dsvl2[serve]'``); importing this
package does not import them.
"""
