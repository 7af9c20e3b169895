"""One task per key and event loop, shared by every coroutine that asks for the same thing.

The blob downloader keys flights by destination path: coroutines of one event loop that want
the same blob at the same time await one download instead of queueing on its file lock. Each
caller may pass a progress callback; the flight reports every delta to all of them (a caller
that joins late first gets what was reported before it came), and a callback that raises is
logged once and otherwise ignored. A flight is canceled only when every caller awaiting it
has been canceled.
"""

from __future__ import annotations

import asyncio
import threading
import weakref
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

from gen_worker.logs import log

__all__ = ["SingleFlight", "report_progress"]

T = TypeVar("T")
ProgressCallback = Callable[[int], None]


class _Listener:
    def __init__(self, callback: ProgressCallback) -> None:
        self.callback = callback
        self.failed = False

    def __call__(self, delta: int) -> None:
        try:
            self.callback(delta)
        except Exception as exc:  # progress must never break a download
            if not self.failed:
                self.failed = True  # one log line per callback, not one per chunk
                log("warning", "download progress callback failed", error=repr(exc))


def report_progress(callback: ProgressCallback | None, delta: int) -> None:
    """Call ``callback(delta)`` the way a flight does: never raising into the caller."""
    if callback is not None and delta > 0:
        _Listener(callback)(delta)


class _Flight(Generic[T]):
    def __init__(
        self,
        start: Callable[[ProgressCallback], Awaitable[T]],
        forget: Callable[[_Flight[T]], None],
    ) -> None:
        self._listeners: list[_Listener] = []
        self._reported = 0
        self._waiters = 0
        self._forget = forget
        self.task = asyncio.ensure_future(start(self._emit))
        self.task.add_done_callback(lambda _: forget(self))

    def _emit(self, delta: int) -> None:
        self._reported += delta
        for listener in self._listeners:
            listener(delta)

    async def join(self, on_progress: ProgressCallback | None) -> T:
        listener = _Listener(on_progress) if on_progress is not None else None
        if listener is not None:
            if self._reported:
                listener(self._reported)
            self._listeners.append(listener)
        self._waiters += 1
        try:
            return await asyncio.shield(self.task)
        except asyncio.CancelledError:
            if self._waiters == 1 and not self.task.done():
                # Nobody waits any more. A caller arriving from now on starts a new flight
                # (which waits for whatever this one still holds) instead of joining this one.
                self._forget(self)
                self.task.cancel()
            raise
        finally:
            self._waiters -= 1
            if listener is not None:
                self._listeners.remove(listener)


class SingleFlight(Generic[T]):
    """The flights in progress, per event loop (usable from several threads, one loop each)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._flights: weakref.WeakKeyDictionary[
            asyncio.AbstractEventLoop, dict[str, _Flight[T]]
        ] = weakref.WeakKeyDictionary()

    async def run(
        self,
        key: str,
        start: Callable[[ProgressCallback], Awaitable[T]],
        on_progress: ProgressCallback | None = None,
    ) -> T:
        """Await the flight for ``key``, starting it as ``start(emit)`` when there is none."""
        loop = asyncio.get_running_loop()
        with self._lock:
            flights = self._flights.setdefault(loop, {})
            flight = flights.get(key)
            if flight is None:
                flight = _Flight(start, lambda f: self._forget(loop, key, f))
                flights[key] = flight
        return await flight.join(on_progress)

    def _forget(self, loop: asyncio.AbstractEventLoop, key: str, flight: _Flight[T]) -> None:
        with self._lock:
            flights = self._flights.get(loop, {})
            if flights.get(key) is flight:
                del flights[key]
