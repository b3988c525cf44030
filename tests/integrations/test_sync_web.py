"""Sync web frameworks call a batcher from their worker threads.

A Flask app served by werkzeug's threaded server on a loopback socket, whose batcher runs on a
background loop (``BatcherThread``); a FastAPI ``def`` endpoint (run in the thread pool) calling
the batcher started in the app's lifespan; a model wrapper used from a sync program.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager

import httpx
import pytest
import torch
from fastapi import FastAPI
from flask import Flask, Response, jsonify, request
from werkzeug.serving import make_server

from batchio import Batcher, BatcherThread
from batchio.integrations.torch import BatchedModule

N = 16


def square_all(xs: list[float]) -> list[float]:
    return [x * x for x in xs]


@pytest.fixture
def flask_server() -> Iterator[tuple[str, Batcher[float, float]]]:
    app = Flask(__name__)
    # One batch of N: dispatched only once every client's row is queued, so batching is certain.
    background = BatcherThread(Batcher(square_all, max_batch_size=N, max_wait=60.0))
    batcher = background.start()

    @app.post("/square")
    def square() -> Response:
        x = float(request.get_json()["x"])
        return jsonify(x=x, y=batcher.call_sync(x))  # blocks this request's thread only

    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}", batcher
    finally:
        server.shutdown()
        thread.join(10)
        background.stop()


def test_a_flask_endpoint_over_a_real_socket_batches_concurrent_requests(
    flask_server: tuple[str, Batcher[float, float]],
) -> None:
    url, batcher = flask_server
    replies: list[dict[str, float]] = [{} for _ in range(N)]

    def client(i: int) -> None:
        with httpx.Client(base_url=url, timeout=30) as c:
            response = c.post("/square", json={"x": i})
            response.raise_for_status()
            replies[i] = response.json()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(N)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
        assert not t.is_alive()
    assert replies == [{"x": float(i), "y": float(i * i)} for i in range(N)]
    assert dict(batcher.statistics().batch_size_histogram) == {N: 1}


@pytest.mark.anyio
async def test_a_fastapi_def_endpoint_calls_the_lifespans_batcher_from_the_thread_pool() -> None:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with Batcher(square_all, max_batch_size=8, max_wait=60.0) as b:
            app.state.batcher = b
            yield

    app = FastAPI(lifespan=lifespan)

    @app.get("/square/{x}")
    def square(x: float) -> dict[str, float]:  # sync: FastAPI runs it in a worker thread
        return {"y": app.state.batcher.call_sync(x)}

    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            responses = await asyncio.gather(*(client.get(f"/square/{i}") for i in range(8)))
        stats = app.state.batcher.statistics()
    assert [r.json()["y"] for r in responses] == [float(i * i) for i in range(8)]
    assert dict(stats.batch_size_histogram) == {8: 1}


def test_a_model_wrapper_runs_in_a_sync_program() -> None:
    torch.manual_seed(0)
    linear = torch.nn.Linear(4, 2)
    rows = [torch.randn(4) for _ in range(10)]
    with torch.no_grad():
        expected = [linear(r) for r in rows]

    async def stream_all(module: BatchedModule) -> list[torch.Tensor]:
        return [y async for y in module.imap(rows, max_in_flight=4)]

    thread = BatcherThread(BatchedModule(linear, max_batch_size=4, max_wait=0.0))
    with thread as module:
        one = module.call_sync(rows[0])
        many = module.map_sync(rows)
        streamed = thread.run(stream_all, module)
    assert torch.allclose(one, expected[0], atol=1e-6)
    for got in (many, streamed):
        assert all(torch.allclose(g, e, atol=1e-6) for g, e in zip(got, expected, strict=True))
