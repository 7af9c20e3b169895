"""The ordered outcome channel of one request.

All outcomes get their sequence number on the event loop thread, in the order they are
posted, so the channel is ordered even when a sync function reports progress from a worker
thread. Once the terminal outcome is in, everything later is dropped: a canceled function that
keeps running cannot add to a request that has already ended.

A consumer reads the channel in one of two ways. *Pulling* (``async for outcome in channel``,
or ``channel.batches()`` for everything posted since the last look, as one list) suits a
caller that awaits one request, like the dev runner. *Pushing* (``channel.attach(sink)``)
hands each batch to a callback: from a ``call_soon`` callback soon after it was posted, and
the batch that ends the request at once, as its terminal outcome is posted. The gRPC worker
serves many requests at once, and a reader task per request cost two task switches per request
that a callback does not. The engine itself posts from the loop thread without the thread
check (``emit``, ``emit_many``).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any

import msgspec

from gen_worker.engine.outcomes import (
    Delta,
    Event,
    Failure,
    Log,
    Outcome,
    Progress,
    Result,
)

__all__ = ["OutcomeChannel", "Sink"]

_RESERVED_DETAIL = ("progress", "stage")

#: Receives every outcome of a request in order, a batch at a time; the last batch ends with
#: the terminal outcome.
Sink = Callable[[list[Outcome]], None]


class OutcomeChannel:
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._loop_thread = threading.get_ident()
        # Posted and not yet taken, in seq order. A plain list swapped out whole by the
        # consumer: with about ten outcomes per request, a queue's per-item bookkeeping was the
        # largest single cost of a no-op request.
        self._pending: list[Outcome] = []
        self._waiter: asyncio.Future[None] | None = None
        self._sink: Sink | None = None
        self._flush_scheduled = False
        self._flushing = False
        self._taken_terminal = False
        self._seq = 0
        self.terminal: Result | Failure | None = None
        self.delta_count = 0

    @property
    def next_seq(self) -> int:
        return self._seq

    @property
    def has_pending(self) -> bool:
        """Whether outcomes were posted that no consumer has taken (or been handed) yet."""
        return bool(self._pending)

    def _on_loop(self, fn: Callable[..., None], *args: Any) -> None:
        """Run ``fn`` on the loop thread: now if we are on it, else as soon as possible."""
        if threading.get_ident() == self._loop_thread:
            fn(*args)
        else:
            self._loop.call_soon_threadsafe(fn, *args)

    # -- posting (any thread) ---------------------------------------------------------------

    def event(self, event_type: str, payload: dict[str, Any] | None = None) -> None:
        self._on_loop(self.emit, event_type, payload or {})

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

    def emit(self, event_type: str, payload: dict[str, Any]) -> None:
        """Post an event; the engine's own fast path (it is always on the loop thread)."""
        if self.terminal is None:
            seq = self._seq
            self._seq = seq + 1
            self._pending.append(Event(seq, event_type, payload))
            if self._sink is not None or self._waiter is not None:
                self._notify()

    def emit_many(self, events: tuple[tuple[str, dict[str, Any]], ...]) -> None:
        """Post several events in order, as one (the engine's lifecycle events come in runs)."""
        if self.terminal is None:
            seq = self._seq
            self._seq = seq + len(events)
            self._pending.extend([Event(seq + i, t, p) for i, (t, p) in enumerate(events)])
            if self._sink is not None or self._waiter is not None:
                self._notify()

    def _put(self, outcome: Outcome) -> None:
        self._pending.append(outcome)
        self._notify()

    def _notify(self) -> None:
        if self._sink is not None:
            if not self._flush_scheduled:
                # One callback per batch: everything posted until it runs goes with it.
                self._flush_scheduled = True
                self._loop.call_soon(self._flush)
            return
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    def _put_delta(self, data: bytes) -> None:
        if self.terminal is None:
            self.delta_count += 1
            seq = self._seq
            self._seq = seq + 1
            self._put(Delta(seq, data))

    def _put_hook(self, event_type: str, payload: dict[str, Any]) -> None:
        if self.terminal is not None:
            return
        seq = self._seq
        if event_type == "request.progress":
            detail = {k: v for k, v in payload.items() if k not in _RESERVED_DETAIL}
            stage = payload.get("stage")
            outcome: Outcome = Progress(seq, payload["progress"], stage, detail)
        elif event_type == "request.log":
            outcome = Log(seq, payload["message"], payload.get("level", "info"))
        else:
            outcome = Event(seq, event_type, payload)
        self._seq = seq + 1
        self._put(outcome)

    def finish(self, make: Callable[[int], Result | Failure]) -> bool:
        """Post the terminal outcome built by ``make(seq)``; False if one was already posted."""
        if self.terminal is not None:
            return False
        seq = self._seq
        self._seq = seq + 1
        outcome = make(seq)
        self.terminal = outcome
        self._put(outcome)
        if self._sink is not None and not self._flushing:
            # The request is over: hand the rest over now rather than one loop iteration later
            # (the worker writes its answer an iteration sooner). A flush scheduled earlier
            # then finds nothing left.
            self._flush()
        return True

    # -- consuming ------------------------------------------------------------------------------

    def attach(self, sink: Sink) -> None:
        """Push every outcome to ``sink`` (on the loop, in order) instead of being iterated."""
        self._sink = sink
        if self._pending and not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        sink = self._sink
        if sink is None or self._flushing:
            return
        # A sink may post more (a cancel while it handles the batch): those go out after it,
        # from this loop, never from a nested call, so the order stays the posting order.
        self._flushing = True
        try:
            while self._pending:
                batch, self._pending = self._pending, []
                if batch[-1] is self.terminal:
                    # Nothing follows the terminal outcome; the sink usually refers to the
                    # run that refers to this channel, a cycle only the GC would free.
                    self._sink = None
                try:
                    sink(batch)
                except Exception as exc:  # the consumer's bug must not end the request's run
                    self._loop.call_exception_handler(
                        {"message": "outcome sink failed", "exception": exc}
                    )
        finally:
            self._flushing = False

    async def take(self) -> list[Outcome]:
        """Every outcome posted since the last take (at least one), in order; after the
        terminal outcome was taken, an empty list."""
        while not self._pending:
            if self._taken_terminal:
                return []
            waiter = self._waiter = self._loop.create_future()
            try:
                await waiter
            finally:
                self._waiter = None
        batch, self._pending = self._pending, []
        if self.terminal is not None and batch[-1] is self.terminal:
            self._taken_terminal = True
        return batch

    def take_nowait(self) -> list[Outcome]:
        """Every outcome posted since the last take, without waiting (maybe none)."""
        batch, self._pending = self._pending, []
        if batch and batch[-1] is self.terminal:
            self._taken_terminal = True
        return batch

    def batches(self) -> _BatchIterator:
        """The outcomes as lists, each everything posted meanwhile; the last ends terminal."""
        return _BatchIterator(self)

    def __aiter__(self) -> _ChannelIterator:
        """Every outcome in order, ending with the terminal one."""
        return _ChannelIterator(self)


class _BatchIterator:
    """A plain async iterator (not an async generator: leaving one early is free, while an
    abandoned async generator costs a finalizer round trip through the loop)."""

    def __init__(self, channel: OutcomeChannel) -> None:
        self._channel = channel

    def __aiter__(self) -> _BatchIterator:
        return self

    async def __anext__(self) -> list[Outcome]:
        batch = await self._channel.take()
        if not batch:
            raise StopAsyncIteration
        return batch


class _ChannelIterator:
    """One outcome at a time, taken from the channel a batch at a time."""

    def __init__(self, channel: OutcomeChannel) -> None:
        self._channel = channel
        self._batch: list[Outcome] = []
        self._index = 0

    def __aiter__(self) -> _ChannelIterator:
        return self

    async def __anext__(self) -> Outcome:
        if self._index >= len(self._batch):
            self._batch = await self._channel.take()
            self._index = 0
            if not self._batch:
                raise StopAsyncIteration
        outcome = self._batch[self._index]
        self._index += 1
        return outcome
