"""The ordered outcome channel of one request.

All outcomes get their sequence number on the event loop thread, in the order they are
posted, so the channel is ordered even when a sync function reports progress from a worker
thread. Once the terminal outcome is in, everything later is dropped: a canceled function that
keeps running cannot add to a request that has already ended.
"""

from __future__ import annotations

import asyncio
import collections
import threading
from collections.abc import Callable
from typing import Any

import msgspec

from gen_worker.engine.outcomes import (
    TERMINAL,
    Delta,
    Event,
    Failure,
    Log,
    Outcome,
    Progress,
    Result,
)

__all__ = ["OutcomeChannel"]

_RESERVED_DETAIL = ("progress", "stage")


class OutcomeChannel:
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._loop_thread = threading.get_ident()
        self._queue = _Inbox(loop)
        self._seq = 0
        self.terminal: Result | Failure | None = None
        self.delta_count = 0

    @property
    def next_seq(self) -> int:
        return self._seq

    def _take_seq(self) -> int:
        seq = self._seq
        self._seq += 1
        return seq

    def _on_loop(self, fn: Callable[..., None], *args: Any) -> None:
        """Run ``fn`` on the loop thread: now if we are on it, else as soon as possible."""
        if threading.get_ident() == self._loop_thread:
            fn(*args)
        else:
            self._loop.call_soon_threadsafe(fn, *args)

    # -- posting (any thread) ---------------------------------------------------------------

    def event(self, event_type: str, payload: dict[str, Any] | None = None) -> None:
        self._on_loop(self._put_event, event_type, payload or {})

    def delta(self, data: bytes) -> None:
        self._on_loop(self._put_delta, data)

    def hook(self, event_type: str, payload: dict[str, Any]) -> None:
        """The context's emit hook: progress and log become their own outcome kinds."""
        if event_type not in ("request.progress", "request.log"):
            try:
                msgspec.json.encode(payload)
            except (TypeError, msgspec.EncodeError) as exc:
                raise TypeError(
                    f"ctx.emit({event_type!r}, ...): the payload must be JSON-encodable ({exc})"
                ) from None
        self._on_loop(self._put_hook, event_type, payload)

    # -- on the loop --------------------------------------------------------------------------

    def _put(self, outcome: Outcome) -> None:
        if self.terminal is None:
            self._queue.put_nowait(outcome)

    def _put_event(self, event_type: str, payload: dict[str, Any]) -> None:
        if self.terminal is None:
            self._put(Event(self._take_seq(), event_type, payload))

    def _put_delta(self, data: bytes) -> None:
        if self.terminal is None:
            self.delta_count += 1
            self._put(Delta(self._take_seq(), data))

    def _put_hook(self, event_type: str, payload: dict[str, Any]) -> None:
        if self.terminal is not None:
            return
        if event_type == "request.progress":
            detail = {k: v for k, v in payload.items() if k not in _RESERVED_DETAIL}
            stage = payload.get("stage")
            self._put(Progress(self._take_seq(), payload["progress"], stage, detail))
        elif event_type == "request.log":
            self._put(Log(self._take_seq(), payload["message"], payload.get("level", "info")))
        else:
            self._put(Event(self._take_seq(), event_type, payload))

    def finish(self, make: Callable[[int], Result | Failure]) -> bool:
        """Post the terminal outcome built by ``make(seq)``; False if one was already posted."""
        if self.terminal is not None:
            return False
        outcome = make(self._take_seq())
        self._queue.put_nowait(outcome)
        self.terminal = outcome
        return True

    def __aiter__(self) -> _ChannelIterator:
        """Every outcome in order, ending with the terminal one."""
        return _ChannelIterator(self._queue)


class _Inbox:
    """An unbounded single-consumer queue: a deque plus one waiter.

    ``asyncio.Queue`` does a getter/putter bookkeeping dance on every item; with about ten
    outcomes per request that was the largest single cost of a no-op request.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._items: collections.deque[Outcome] = collections.deque()
        self._waiter: asyncio.Future[None] | None = None

    def put_nowait(self, item: Outcome) -> None:
        self._items.append(item)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def get(self) -> Outcome:
        while not self._items:
            self._waiter = self._loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self._items.popleft()


class _ChannelIterator:
    """A plain async iterator (not an async generator: leaving one early is free, while an
    abandoned async generator costs a finalizer round trip through the loop)."""

    def __init__(self, queue: _Inbox) -> None:
        self._queue = queue
        self._done = False

    def __aiter__(self) -> _ChannelIterator:
        return self

    async def __anext__(self) -> Outcome:
        if self._done:
            raise StopAsyncIteration
        outcome = await self._queue.get()
        self._done = isinstance(outcome, TERMINAL)
        return outcome
