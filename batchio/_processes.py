"""Preparing in worker processes: the prepare stage's process pool (``Stages(prepare_processes=)``).

Tokenizing and similar per-item work holds the GIL for part of every item, so on threads it
competes with the event loop and the other stages. With ``prepare_processes`` the prepare threads
hand each batch to a pool of spawned processes and wait without the GIL. ``concurrent.futures``
and ``multiprocessing`` are imported only when a pool is made, so ``import batchio`` stays light.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ._worker import call_sync

if TYPE_CHECKING:
    from concurrent.futures import ProcessPoolExecutor

__all__: list[str] = []


_installed: Callable[[list[Any]], Any] | None = None
"""In a prepare worker process: the batcher's ``prepare``, installed once when the process starts."""


def _install(prepare: Callable[[list[Any]], Any]) -> None:
    global _installed  # one prepare per worker process, by design
    _installed = prepare


def _prepare_here(inputs: list[Any], isolate: bool) -> bytes:
    """In a worker process: prepare one batch (bisecting a failure there, with ``isolate``),
    pickled here, so that whatever cannot cross to the parent fails its own row, not the pool.

    ``concurrent.futures`` treats a result the parent cannot unpickle as a broken pool (every
    batch in it fails), and one the worker cannot pickle fails the whole batch.
    """
    import pickle

    assert _installed is not None, "the process pool's initializer did not run"
    try:
        outcomes = call_sync(_installed, inputs, isolate)
    except Exception as exc:
        raise _portable(exc) from None
    outcomes = [_portable(o) if isinstance(o, BaseException) else o for o in outcomes]
    try:
        return pickle.dumps(outcomes)
    except Exception:  # one row (or more) that cannot be pickled: find it, fail it alone
        return pickle.dumps([_picklable_row(o) for o in outcomes])


def _portable(exc: BaseException) -> BaseException:
    """``exc`` if it survives a pickle round trip, else a ``RuntimeError`` that says what it was."""
    import pickle

    try:
        pickle.loads(pickle.dumps(exc))
    except Exception as why:
        return RuntimeError(
            f"{type(exc).__qualname__}: {exc} (raised in a prepare worker process; it cannot be "
            f"sent back as it is: {why!r})"
        )
    return exc


def _picklable_row(row: Any) -> Any:
    import pickle

    try:
        pickle.dumps(row)
    except Exception as why:
        return TypeError(
            f"prepare returned a {type(row).__qualname__} for this item, which cannot be sent "
            f"back from the worker process ({why})"
        )
    return row


def _noop() -> None:
    """Submitted once per process at start, so the processes boot before the first batch."""


class PrepareProcesses:
    """The process pool of a staged batcher's prepare stage, and its replacement when it breaks.

    Nothing here runs on the event loop's thread but :meth:`shutdown`, which only hands the
    stop to a thread: the pool is made, used and stopped on threads (making one writes to a
    pipe; stopping one joins its processes). :meth:`prepare` runs on a prepare thread: it hands
    the batch to the pool and waits (without the GIL). A pool that lost a process
    (``BrokenProcessPool``: killed, ``os._exit``, a crash in native code) fails every batch it
    held and is replaced by a fresh one, once.
    """

    __slots__ = ("_closed", "_count", "_fn", "_lock", "_pool", "_retired", "_running")

    def __init__(self, fn: Callable[[list[Any]], Any], count: int) -> None:
        self._fn = fn
        self._count = count
        self._lock = threading.Lock()
        self._closed = False
        self._running = 0  # batches handed to the pool and not back yet
        self._pool: ProcessPoolExecutor | None = None
        # Pools taken out of service because a job stalled in one of their processes: they
        # finish what else they hold, and are terminated at shutdown.
        self._retired: list[ProcessPoolExecutor] = []
        # Boot the processes now, off the event loop's thread: a spawned interpreter takes a
        # while to start, and the first batches should not wait for it.
        _daemon(self._boot, "batchio-prepare-boot")

    def _current(self) -> ProcessPoolExecutor:
        """The pool, made on first use (under the lock); RuntimeError once shut down."""
        if self._closed:
            raise RuntimeError("the batcher's prepare processes were shut down")
        if self._pool is None:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            self._pool = ProcessPoolExecutor(
                self._count,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_install,
                initargs=(self._fn,),
            )
        return self._pool

    def _boot(self) -> None:
        try:
            with self._lock:
                pool = self._current()
            for _ in range(self._count):  # each submit that finds no idle process starts one
                pool.submit(_noop)
        except RuntimeError:  # shut down (or broken) before it booted: nothing to boot
            pass

    def prepare(self, inputs: list[Any], isolate: bool) -> list[Any]:
        """Prepare one batch in a worker process (called on a prepare thread)."""
        from concurrent.futures.process import BrokenProcessPool

        with self._lock:
            pool = self._current()
            self._running += 1
        try:
            import pickle

            result: list[Any] = pickle.loads(pool.submit(_prepare_here, inputs, isolate).result())
            return result
        except BrokenProcessPool as exc:
            with self._lock:
                if self._pool is pool:  # not replaced yet by another batch that saw it break
                    self._pool = None  # the next batch makes a new one
                    _daemon(functools.partial(_stop, pool, False), "batchio-prepare-stop")
            raise BrokenProcessPool(
                "a prepare worker process died (killed, os._exit, or a crash in native code) "
                "while this batch was being prepared in it; the batch failed, and a new pool of "
                f"{self._count} process(es) takes its place"
            ) from exc
        finally:
            with self._lock:
                self._running -= 1

    def retire(self) -> None:
        """A prepare job stalled: its process is stuck, so new batches go to a fresh pool.

        Called from the event loop's thread; the work (which takes the lock) runs on a thread.
        """
        _daemon(self._retire, "batchio-prepare-retire")

    def _retire(self) -> None:
        with self._lock:
            if self._pool is not None and not self._closed:
                self._retired.append(self._pool)
                self._pool = None  # the next batch makes a new one

    def shutdown(self) -> None:
        """Stop the processes, on a thread (those stuck in an abandoned job are terminated)."""
        _daemon(self._shutdown, "batchio-prepare-stop")

    def _shutdown(self) -> None:
        with self._lock:
            self._closed = True
            pool, self._pool = self._pool, None
            stuck = self._running > 0
            retired, self._retired = self._retired, []
        if pool is not None:
            _stop(pool, stuck)
        for old in retired:
            _stop(old, True)


def _daemon(target: Callable[[], None], name: str) -> None:
    threading.Thread(target=target, name=name, daemon=True).start()


def _stop(pool: ProcessPoolExecutor, terminate: bool) -> None:
    # The pool keeps its processes private; shutdown(wait=True) joins them, but one stuck in a
    # job nobody waits for any more (abandoned past batch_time_limit) must be terminated first.
    processes = list((getattr(pool, "_processes", None) or {}).values())
    if terminate:
        for proc in processes:
            proc.terminate()
    pool.shutdown(wait=True, cancel_futures=True)
    for proc in processes:  # a broken pool may not have joined them all
        proc.join()
