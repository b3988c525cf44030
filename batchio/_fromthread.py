"""Calls from threads: a blocking call that submits on the batcher's loop and waits for the result.

A sync FastAPI endpoint (in the thread pool), a WSGI app or a worker thread cannot ``await``; it
hands the submission to the loop with ``call_soon_threadsafe`` and blocks on a
:class:`concurrent.futures.Future` chained to the request's. The submission runs in a copy of the
caller's context, so what observers capture (the current span) is the calling thread's.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
from collections.abc import Callable
from typing import Any

from ._request import Entry, entry_future

__all__: list[str] = []

_CLOSED_CHECK = 0.25  # seconds between looks at whether the loop was closed under a waiter


def call_from_thread(
    loop: asyncio.AbstractEventLoop,
    enqueue: Callable[[], Entry],
    cancel: Callable[[Entry], None],
    closed: Callable[[], BaseException],
) -> Any:
    """Run ``enqueue()`` on ``loop`` and block until its request resolves; return its result.

    If the waiting thread is interrupted (``KeyboardInterrupt``, say), the request is cancelled
    on the loop (``cancel(entry)`` removes it from the queue) before the interruption propagates.
    ``closed()`` is the error to raise when the loop can no longer take the call.
    """
    done: concurrent.futures.Future[Any] = concurrent.futures.Future()
    entries: list[Entry] = []

    def settle(fut: asyncio.Future[Any]) -> None:
        if fut.cancelled():
            done.set_exception(concurrent.futures.CancelledError())
        elif (exc := fut.exception()) is not None:
            done.set_exception(exc)
        else:
            done.set_result(fut.result())

    def submit() -> None:
        if not done.set_running_or_notify_cancel():  # (interrupted before it got here)
            return
        try:
            entry = enqueue()
        except BaseException as exc:  # a refusal (closed, full, bad argument) is the caller's
            done.set_exception(exc)
            return
        entries.append(entry)
        entry_future(entry).add_done_callback(settle)

    def withdraw() -> None:
        if entries:
            entry = entries[0]
            fut = entry_future(entry)
            if not fut.done():
                fut.cancel()
                cancel(entry)

    try:
        loop.call_soon_threadsafe(submit, context=contextvars.copy_context())
    except RuntimeError as exc:  # the loop was closed
        raise closed() from exc
    try:
        # In slices: a loop stopped and closed with this request pending (not drained) would
        # leave it unresolved for ever; the slice notices, instead of hanging the thread.
        while not concurrent.futures.wait((done,), timeout=_CLOSED_CHECK)[0]:
            if loop.is_closed():
                raise closed()
        return done.result()
    except BaseException:
        if not done.done():
            done.cancel()  # not submitted yet: it never will be
            try:
                loop.call_soon_threadsafe(withdraw)
            except RuntimeError:  # pragma: no cover - the loop closed meanwhile
                pass
        raise
