"""A batcher for sync programs: its event loop runs in a background thread.

A script, a Flask or Django app has no event loop of its own. :class:`BatcherThread` starts one in
a thread, enters the batcher (or a model wrapper that owns one) there, and gives the program the
entered object, whose ``call_sync`` and ``map_sync`` block the calling thread only.

Why not anyio's blocking portal, which does the loop-in-a-thread part: its thread is not a daemon,
so a program that never reaches ``stop()`` (an app server killed with SIGTERM that runs only its
``atexit`` handlers) hangs at exit joining it. Here the thread is a daemon and ``stop()`` is also
an ``atexit`` handler: the process drains the batcher and exits.
"""

from __future__ import annotations

import asyncio
import atexit
import threading
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from types import TracebackType
from typing import Any, Generic, TypeVar

__all__ = ["BatcherThread"]

T = TypeVar("T")
R = TypeVar("R")

_ExcInfo = tuple[type[BaseException] | None, BaseException | None, TracebackType | None]


class BatcherThread(Generic[T]):
    """Runs an async context manager (a :class:`~batchio.Batcher`, or a model wrapper such as
    ``SentenceEmbedder``) on an event loop in a background thread, for a sync program.

    Use it as a ``with`` block; it yields what entering ``owner`` returns, ready for
    :meth:`~batchio.Batcher.call_sync` from any thread::

        with batchio.BatcherThread(Batcher(embed_many, max_batch_size=64)) as embed:
            vectors = [embed.call_sync(text) for text in texts]  # or from many threads

    Leaving the block exits ``owner`` on its loop, which drains it: every request already
    accepted gets its result, exactly as ``async with`` does. Or call :meth:`start` and
    :meth:`stop` (a Flask or Django app: start at import, stop at shutdown); a started thread
    not stopped by the program is stopped, and drained, at interpreter exit.

    Args:
        owner: the async context manager to enter on the background loop.
        use_uvloop: run the loop on uvloop (it must be installed).
        name: the thread's name (default: ``batchio-loop-`` and the owner's name).
    """

    def __init__(
        self,
        owner: AbstractAsyncContextManager[T],
        *,
        use_uvloop: bool = False,
        name: str | None = None,
    ) -> None:
        self._owner = owner
        self._use_uvloop = use_uvloop
        label = getattr(owner, "name", None) or type(owner).__name__
        self._thread_name = name or f"batchio-loop-{label}"
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_event: asyncio.Event | None = None
        self._entered = threading.Event()
        self._value: T | None = None
        self._enter_error: BaseException | None = None
        self._exit_error: BaseException | None = None
        self._exc_info: _ExcInfo = (None, None, None)
        self._stop_requested = False

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped" if self._thread else "not started"
        return f"<batchio.BatcherThread {self._thread_name!r} {state}>"

    @property
    def running(self) -> bool:
        """True between a successful :meth:`start` and :meth:`stop`."""
        thread = self._thread
        return thread is not None and thread.is_alive() and self._enter_error is None

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The background event loop (to hand coroutines to, with
        :func:`asyncio.run_coroutine_threadsafe`).

        Raises:
            RuntimeError: not started.
        """
        if self._loop is None:
            raise RuntimeError(f"{self!r} has not been started")
        return self._loop

    def start(self) -> T:
        """Start the loop thread, enter ``owner`` there, and return what entering returned.

        Raises:
            RuntimeError: started before (a ``BatcherThread`` runs once).
            Exception: whatever entering ``owner`` raised (the thread has stopped then).
        """
        with self._lock:
            if self._thread is not None:
                raise RuntimeError(f"{self!r} cannot be started twice")
            thread = self._thread = threading.Thread(
                target=self._run, name=self._thread_name, daemon=True
            )
            thread.start()
        self._entered.wait()
        if self._enter_error is not None:
            thread.join()
            raise self._enter_error
        atexit.register(self.stop)
        return self._value  # type: ignore[return-value]

    def stop(self) -> None:
        """Exit ``owner`` on its loop (a batcher drains), stop the loop and join its thread.

        Idempotent; a no-op before :meth:`start`. Safe from any thread but the loop's own.

        Raises:
            RuntimeError: called from the background loop's thread (it would wait for itself).
            Exception: whatever exiting ``owner`` raised.
        """
        thread = self._thread
        if thread is None:
            return
        if threading.current_thread() is thread:
            raise RuntimeError(f"{self!r}.stop() was called on its own loop's thread")
        with self._lock:  # (a loop still starting sees the request when it is ready)
            self._stop_requested = True
            loop, stop = self._loop, self._stop_event
        if loop is not None and stop is not None:
            try:
                loop.call_soon_threadsafe(stop.set)
            except RuntimeError:  # the loop has finished already
                pass
        thread.join()
        atexit.unregister(self.stop)
        error, self._exit_error = self._exit_error, None
        if error is not None:
            raise error

    def run(self, fn: Callable[..., Awaitable[R]], *args: Any) -> R:
        """Run the coroutine ``fn(*args)`` on the background loop and block for its result.

        For what has no blocking twin: consuming :meth:`~batchio.Batcher.imap` in a sync
        program, say (``thread.run(write_all, path)`` with an ``async def write_all``).

        Raises:
            RuntimeError: not started, or stopped.
        """
        loop = self.loop  # (first: a coroutine made and never awaited would warn)
        if not self.running:
            raise RuntimeError(f"{self!r} is not running")
        future = asyncio.run_coroutine_threadsafe(_call(fn, args), loop)
        try:
            return future.result()
        except BaseException:
            future.cancel()  # an interrupted caller (Ctrl-C) cancels the coroutine it started
            raise

    def __enter__(self) -> T:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._exc_info = (exc_type, exc, tb)
        self.stop()

    # -- on the background thread --------------------------------------------------------------

    def _run(self) -> None:
        try:
            factory = None
            if self._use_uvloop:
                import uvloop

                factory = uvloop.new_event_loop
            with asyncio.Runner(loop_factory=factory) as runner:
                runner.run(self._main())
        except BaseException as exc:  # (a loop that failed to start): start() reports it
            if not self._entered.is_set():
                self._enter_error = exc
            else:  # pragma: no cover - _main catches what the owner's exit raises
                self._exit_error = exc
        finally:
            self._entered.set()

    async def _main(self) -> None:
        stop = asyncio.Event()
        with self._lock:
            self._loop = asyncio.get_running_loop()
            self._stop_event = stop
            if self._stop_requested:  # stop() came while the loop was starting
                stop.set()
        try:
            value = await self._owner.__aenter__()
        except BaseException as exc:
            self._enter_error = exc
            return
        self._value = value
        self._entered.set()
        try:
            await stop.wait()
        finally:
            try:
                await self._owner.__aexit__(*self._exc_info)
            except BaseException as exc:
                self._exit_error = exc


async def _call(fn: Callable[..., Awaitable[R]], args: tuple[Any, ...]) -> R:
    return await fn(*args)
