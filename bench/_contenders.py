"""The contenders: batchio, the raw asyncio floor and the peer libraries, behind one interface.

Each contender turns the same batch function and the same :class:`BatchSpec` into an async
``call(item) -> result`` inside an async context manager (started on the running loop, torn down
at exit). ``options(spec)`` returns the exact constructor options used, for the printed tables and
the JSON results.

How each peer runs a *sync* batch function (what its docs show):

* batchio: its own dedicated worker thread (one, ``max_concurrent_batches=1``).
* ``batched.aio.dynamically``: ``asyncio.to_thread`` (the loop's default executor).
* ``batched.dynamically`` + ``.acall``: its own daemon thread; the caller awaits
  ``asyncio.wrap_future`` of a ``concurrent.futures.Future``.
* ``async-batcher``: ``run_in_executor(executor, ...)``; we pass a dedicated 1-thread executor, the
  same as batchio's.
* ``aiobatch.async_queuing``: ``asyncio.to_thread``; sync batch functions only.
* Ray Serve ``@serve.batch``: takes only ``async def`` handlers; a sync function is wrapped in
  ``loop.run_in_executor`` on a dedicated 1-thread executor, the way a Serve user would.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import importlib.util
import inspect
import os
import sys
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ._harness import BatchFn, BatchSpec, Call, LoopName, open_floor, open_floor_thread

__all__ = [
    "CONTENDERS",
    "DEADLINE",
    "EMBEDDER",
    "EMBEDDER_MBT",
    "EMBEDDER_MBT_PLAIN",
    "MODEL_ONLY",
    "Contender",
    "batchio_deadline_contender",
    "batchio_options_contender",
    "by_name",
    "embedder_contender",
    "loops_for",
]

EMBEDDER = "batchio.SentenceEmbedder"
EMBEDDER_MBT = "batchio.SentenceEmbedder+mbt"  # with max_batch_tokens (length-sorted micro-batches)
# The same, with staged=False: one worker thread tokenizes, runs and splits in series (before/after
# the staged form, side by side in one run).
EMBEDDER_MBT_PLAIN = "batchio.SentenceEmbedder+mbt[plain]"
DEADLINE = "batchio+deadline"  # open loop only: timeout = the goodput SLO
MODEL_ONLY = (EMBEDDER, EMBEDDER_MBT, EMBEDDER_MBT_PLAIN, DEADLINE)

Opener = Callable[[BatchFn, BatchSpec], contextlib.AbstractAsyncContextManager[Call]]


@dataclass(frozen=True)
class Contender:
    """One way of batching, as the load generators see it."""

    name: str
    description: str
    opener: Opener
    options: Callable[[BatchSpec], dict[str, Any]]
    check_import: Callable[[], None]
    sync_fn: bool = True  # accepts a sync batch function
    async_fn: bool = True  # accepts an ``async def`` batch function
    is_floor: bool = False

    def unavailable(self) -> str | None:
        """``None`` if this contender can run here, else the reason (printed as a skip)."""
        try:
            self.check_import()
        except Exception as exc:  # ImportError, or a peer failing at import time
            return f"{type(exc).__name__}: {exc}"
        return None

    def supports(self, fn: BatchFn) -> bool:
        return self.async_fn if inspect.iscoroutinefunction(fn) else self.sync_fn

    def open(self, fn: BatchFn, spec: BatchSpec) -> contextlib.AbstractAsyncContextManager[Call]:
        return self.opener(fn, spec)


# -- batchio -----------------------------------------------------------------------------------


def _batchio_cls() -> Any:
    import batchio

    cls = getattr(batchio, "Batcher", None)
    if cls is None:  # the package's __init__ may not re-export it yet
        from batchio._batcher import Batcher

        cls = Batcher
    return cls


def _import_batchio() -> None:
    _batchio_cls()


@contextlib.asynccontextmanager
async def _open_batchio(fn: BatchFn, spec: BatchSpec) -> AsyncIterator[Call]:
    batcher = _batchio_cls()(fn, max_batch_size=spec.max_batch_size, max_wait=spec.max_wait)
    async with batcher:
        yield batcher


@contextlib.asynccontextmanager
async def _open_batchio_nowait(fn: BatchFn, spec: BatchSpec) -> AsyncIterator[Call]:
    batcher = _batchio_cls()(fn, max_batch_size=spec.max_batch_size, max_wait=spec.max_wait)
    async with batcher:
        yield batcher.submit_nowait  # the future-returning twin: no coroutine per call


BASELINE_ENV = "BATCHIO_BASELINE"


def _baseline_cls() -> Any:
    """``Batcher`` from another checkout of batchio (the directory that holds its ``batchio/``,
    named by ``$BATCHIO_BASELINE``), loaded as ``batchio_baseline``: before/after in one run."""
    root = os.environ.get(BASELINE_ENV)
    if not root:
        raise ImportError(f"set {BASELINE_ENV} to a checkout of batchio to compare against")
    mod = sys.modules.get("batchio_baseline")
    if mod is None:
        pkg = Path(root) / "batchio"
        spec = importlib.util.spec_from_file_location(
            "batchio_baseline", pkg / "__init__.py", submodule_search_locations=[str(pkg)]
        )
        if spec is None or spec.loader is None:
            raise ImportError(f"no batchio package under {root}")
        mod = importlib.util.module_from_spec(spec)
        sys.modules["batchio_baseline"] = mod
        spec.loader.exec_module(mod)
    return mod.Batcher


@contextlib.asynccontextmanager
async def _open_baseline(fn: BatchFn, spec: BatchSpec) -> AsyncIterator[Call]:
    batcher = _baseline_cls()(fn, max_batch_size=spec.max_batch_size, max_wait=spec.max_wait)
    async with batcher:
        yield batcher


def _import_baseline() -> None:
    _baseline_cls()


def _batchio_options(spec: BatchSpec) -> dict[str, Any]:
    return {
        "max_batch_size": spec.max_batch_size,
        "max_wait": spec.max_wait,
        "max_concurrent_batches": 1,
    }


# -- mixedbread batched ------------------------------------------------------------------------


def _import_batched() -> None:
    importlib.import_module("batched")


@contextlib.asynccontextmanager
async def _open_batched_aio(fn: BatchFn, spec: BatchSpec) -> AsyncIterator[Call]:
    batched = importlib.import_module("batched")

    proc = batched.aio.dynamically(
        fn, batch_size=spec.max_batch_size, timeout_ms=spec.max_wait * 1000
    )
    try:
        yield proc
    finally:
        task = getattr(proc, "_task", None)  # batched has no close(); it cancels in __del__
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


def _batched_aio_options(spec: BatchSpec) -> dict[str, Any]:
    return {"batch_size": spec.max_batch_size, "timeout_ms": spec.max_wait * 1000}


@contextlib.asynccontextmanager
async def _open_batched_thread(fn: BatchFn, spec: BatchSpec) -> AsyncIterator[Call]:
    batched = importlib.import_module("batched")

    proc = batched.dynamically(fn, batch_size=spec.max_batch_size, timeout_ms=spec.max_wait * 1000)
    try:
        yield proc.acall
    finally:
        await asyncio.to_thread(proc.shutdown)


# -- async-batcher -----------------------------------------------------------------------------


def _import_async_batcher() -> None:
    importlib.import_module("async_batcher.batcher")


@contextlib.asynccontextmanager
async def _open_async_batcher(fn: BatchFn, spec: BatchSpec) -> AsyncIterator[Call]:
    AsyncBatcher: Any = importlib.import_module("async_batcher.batcher").AsyncBatcher

    if inspect.iscoroutinefunction(fn):

        class AsyncFnBatcher(AsyncBatcher):  # type: ignore[misc]
            async def process_batch(self, batch: list[Any]) -> list[Any]:
                return list(await fn(batch))

        batcher: Any = AsyncFnBatcher(
            max_batch_size=spec.max_batch_size, max_queue_time=spec.max_wait, concurrency=1
        )
        executor = None
    else:

        class SyncFnBatcher(AsyncBatcher):  # type: ignore[misc]
            def process_batch(self, batch: list[Any]) -> list[Any]:
                return list(fn(batch))

        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="async-batcher")
        batcher = SyncFnBatcher(
            max_batch_size=spec.max_batch_size,
            max_queue_time=spec.max_wait,
            concurrency=1,
            executor=executor,
        )
    try:
        yield batcher.process
    finally:
        # A graceful stop() polls a 1-second wait_for; force=True cancels its tasks at once.
        await batcher.stop(force=True)
        await asyncio.sleep(0)
        if executor is not None:
            executor.shutdown(wait=True)


def _async_batcher_options(spec: BatchSpec) -> dict[str, Any]:
    return {
        "max_batch_size": spec.max_batch_size,
        "max_queue_time": spec.max_wait,
        "concurrency": 1,
        "executor": "ThreadPoolExecutor(max_workers=1) (sync fn only)",
    }


# -- aiobatch ----------------------------------------------------------------------------------


def _import_aiobatch() -> None:
    aiobatch_task: Any = importlib.import_module("aiobatch.task")

    async def probe() -> None:
        # aiobatch's AsyncTask subclasses asyncio.Future and assigns `self._result` in __init__,
        # which the C-accelerated _asyncio.Future rejects (seen on CPython 3.11.7): every call fails.
        aiobatch_task.AsyncTask([], {})

    asyncio.run(probe())


@contextlib.asynccontextmanager
async def _open_aiobatch(fn: BatchFn, spec: BatchSpec) -> AsyncIterator[Call]:
    aiobatch: Any = importlib.import_module("aiobatch")

    # timeout=0 hits a bug in 0.0.1.dev5 (`await queue.get_nowait()`); max_wait > 0 is required.
    sched = aiobatch.async_queuing(batch_size=spec.max_batch_size, timeout=spec.max_wait)
    wrapped = sched(fn)
    try:
        yield wrapped
    finally:
        worker = sched._worker
        sched.stop()
        if worker is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await worker


def _aiobatch_options(spec: BatchSpec) -> dict[str, Any]:
    return {"batch_size": spec.max_batch_size, "timeout": spec.max_wait, "is_tensor": False}


# -- Ray Serve ---------------------------------------------------------------------------------


def _import_ray() -> None:
    importlib.import_module("ray.serve.batching")


@contextlib.asynccontextmanager
async def _open_ray(fn: BatchFn, spec: BatchSpec) -> AsyncIterator[Call]:
    serve: Any = importlib.import_module("ray.serve")
    batching: Any = importlib.import_module("ray.serve.batching")

    # @serve.batch reads the replica context only to log a warning about max_ongoing_requests; out
    # of a Serve deployment that raises. This one no-op patch is all it needs to run in-process,
    # without ray.init() or a cluster (checked with ray 2.60).
    queue_cls: Any = batching._BatchQueue
    queue_cls._warn_if_max_batch_size_exceeds_max_ongoing_requests = lambda self: None
    executor: ThreadPoolExecutor | None = None
    if inspect.iscoroutinefunction(fn):
        handler = fn
    else:
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ray-batch")
        loop = asyncio.get_running_loop()
        pool = executor

        async def handler(items: list[Any]) -> Any:
            return await loop.run_in_executor(pool, fn, items)

    decorated = serve.batch(max_batch_size=spec.max_batch_size, batch_wait_timeout_s=spec.max_wait)(
        handler
    )
    try:
        yield decorated
    finally:
        lazy = getattr(decorated.set_max_batch_size, "__self__", None)
        queue = getattr(lazy, "_queue", None)
        task = getattr(queue, "_handle_batch_task", None)
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if executor is not None:
            executor.shutdown(wait=True)


def _ray_options(spec: BatchSpec) -> dict[str, Any]:
    return {
        "max_batch_size": spec.max_batch_size,
        "batch_wait_timeout_s": spec.max_wait,
        "max_concurrent_batches": 1,
        "sync fn": "wrapped: await loop.run_in_executor(ThreadPoolExecutor(1), fn, items)",
    }


# -- the floor ---------------------------------------------------------------------------------


def _floor_options(spec: BatchSpec) -> dict[str, Any]:
    return {"chunk": spec.max_batch_size, "fn": "called inline on the loop thread", "timer": None}


def _floor_thread_options(spec: BatchSpec) -> dict[str, Any]:
    return {"chunk": spec.max_batch_size, "fn": "loop.run_in_executor(ThreadPoolExecutor(1))"}


def _nothing() -> None:
    return None


CONTENDERS: tuple[Contender, ...] = (
    Contender(
        "floor", "raw asyncio floor (future + list + consumer task)",
        open_floor, _floor_options, _nothing, is_floor=True,
    ),
    Contender(
        "floor+thread", "raw asyncio floor, sync fn on one worker thread (run_in_executor)",
        open_floor_thread, _floor_thread_options, _nothing, async_fn=False, is_floor=True,
    ),
    Contender(
        "batchio", "batchio.Batcher", _open_batchio, _batchio_options, _import_batchio
    ),
    Contender(
        "batched.aio", "mixedbread batched: @batched.aio.dynamically",
        _open_batched_aio, _batched_aio_options, _import_batched,
    ),
    Contender(
        "batched.thread", "mixedbread batched: @batched.dynamically, awaited via .acall",
        _open_batched_thread, _batched_aio_options, _import_batched, async_fn=False,
    ),
    Contender(
        "async-batcher", "async-batcher: AsyncBatcher subclass, .process()",
        _open_async_batcher, _async_batcher_options, _import_async_batcher,
    ),
    Contender(
        "aiobatch", "aiobatch: @aiobatch.async_queuing",
        _open_aiobatch, _aiobatch_options, _import_aiobatch, async_fn=False,
    ),
    Contender(
        "ray.serve.batch", "Ray Serve @serve.batch, in-process (no cluster)",
        _open_ray, _ray_options, _import_ray,
    ),
)  # fmt: skip

# Only when named (``--contenders batchio,batchio.nowait,batchio@baseline``): how batchio's own
# call paths and versions compare, not a peer comparison.
DIAGNOSTIC: tuple[Contender, ...] = (
    Contender(
        "batchio.nowait", "batchio.Batcher, called through submit_nowait (a future, no coroutine)",
        _open_batchio_nowait, _batchio_options, _import_batchio,
    ),
    Contender(
        "batchio@baseline", f"batchio.Batcher of the checkout in ${BASELINE_ENV} (before/after)",
        _open_baseline, _batchio_options, _import_baseline,
    ),
)  # fmt: skip


# -- batchio's own SentenceEmbedder (model workloads only) -------------------------------------


def embedder_contender(
    net: Any,
    tokenizer: Any,
    *,
    device: str,
    max_length: int,
    max_batch_tokens: int | None = None,
    staged: bool = True,
) -> Contender:
    """batchio.integrations.transformers.SentenceEmbedder on an already-loaded model.

    Staged by default (tokenizing, assembly, the forward pass and splitting on workers of their
    own, overlapping); ``staged=False`` is the plain form, all of it in series on one thread.

    It brings its own batch function (tokenize, forward, mean-pool, normalise, like
    ``bench/_model.py``) and ignores the one handed to every other contender; its mean batch size
    comes from ``statistics()``. With ``max_batch_tokens`` each batch is sorted by length and run
    in micro-batches under that padded-token budget (a batchio feature no peer has).
    """

    def check() -> None:
        from batchio.integrations.transformers import SentenceEmbedder  # noqa: F401

    @contextlib.asynccontextmanager
    async def open_embedder(fn: BatchFn, spec: BatchSpec) -> AsyncIterator[Call]:
        from batchio.integrations.transformers import SentenceEmbedder

        del fn
        emb = SentenceEmbedder(
            net, tokenizer, device=device, max_length=max_length,
            max_batch_size=spec.max_batch_size, max_wait=spec.max_wait,
            max_batch_tokens=max_batch_tokens, staged=staged,
        )  # fmt: skip
        async with emb:
            yield emb

    def options(spec: BatchSpec) -> dict[str, Any]:
        return {
            "max_batch_size": spec.max_batch_size, "max_wait": spec.max_wait,
            "max_length": max_length, "device": device, "max_batch_tokens": max_batch_tokens,
            "staged": staged, "fn": "its own (SentenceEmbedder.embed_batch)",
        }  # fmt: skip

    name = EMBEDDER if max_batch_tokens is None else EMBEDDER_MBT
    if not staged:
        name = EMBEDDER_MBT_PLAIN if max_batch_tokens is not None else f"{EMBEDDER}[plain]"
    return Contender(
        name,
        "batchio.integrations.transformers.SentenceEmbedder"
        + ("" if max_batch_tokens is None else f"(max_batch_tokens={max_batch_tokens})")
        + ("" if staged else ", staged=False"),
        open_embedder, options, check, async_fn=False,
    )  # fmt: skip


def batchio_deadline_contender(timeout: float) -> Contender:
    """batchio with a per-request deadline (``timeout=``): past saturation, requests that cannot
    finish in time fail fast with ``RequestTimeoutError`` (and are dropped before they run)
    instead of piling up; for the open-loop workload."""

    @contextlib.asynccontextmanager
    async def open_deadline(fn: BatchFn, spec: BatchSpec) -> AsyncIterator[Call]:
        batcher = _batchio_cls()(
            fn, max_batch_size=spec.max_batch_size, max_wait=spec.max_wait, timeout=timeout
        )
        async with batcher:
            yield batcher

    def options(spec: BatchSpec) -> dict[str, Any]:
        return {**_batchio_options(spec), "timeout": timeout}

    return Contender(
        "batchio+deadline", f"batchio.Batcher(timeout={timeout:.3g}s)", open_deadline, options,
        _import_batchio,
    )  # fmt: skip


def batchio_options_contender(name: str, **options: Any) -> Contender:
    """batchio with exactly these ``Batcher`` options, plus ``max_batch_size`` from the spec
    unless given: nothing else is passed, so every other option keeps its default (the spec's
    ``max_wait`` included: pass ``max_wait=`` to set it). For ``bench_sched``'s
    ``latency_target=`` contenders and its grid of static settings."""

    def kwargs(spec: BatchSpec) -> dict[str, Any]:
        return {"max_batch_size": spec.max_batch_size, **options}

    @contextlib.asynccontextmanager
    async def open_with(fn: BatchFn, spec: BatchSpec) -> AsyncIterator[Call]:
        batcher = _batchio_cls()(fn, **kwargs(spec))
        async with batcher:
            yield batcher

    shown = ", ".join(f"{k}={v!r}" for k, v in options.items())
    return Contender(
        name, f"batchio.Batcher({shown})", open_with, kwargs, _import_batchio
    )  # fmt: skip


def by_name(names: str | None) -> list[Contender]:
    """The contenders named in a comma-separated list (all when ``None``)."""
    if not names:
        return list(CONTENDERS)
    # batchio.SentenceEmbedder needs a loaded model: bench_model.model_contenders adds it.
    wanted = [n.strip() for n in names.split(",") if n.strip() not in ("", *MODEL_ONLY)]
    known = {c.name: c for c in (*CONTENDERS, *DIAGNOSTIC)}
    missing = [n for n in wanted if n not in known]
    if missing:
        raise SystemExit(f"unknown contender(s) {missing}; choose from {sorted(known)}")
    return [known[n] for n in wanted]


def loops_for(contender: Contender, loops: list[LoopName], peers_on_uvloop: bool) -> list[LoopName]:
    """batchio and the floor run on every requested loop; peers on the default loop only unless
    ``peers_on_uvloop``."""
    if contender.is_floor or contender.name.startswith("batchio") or peers_on_uvloop:
        return loops
    return [loop for loop in loops if loop == "asyncio"] or loops[:1]
