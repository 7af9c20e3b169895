"""One open stream to the scheduler, as the worker shell uses it: an ordered outbox and a
write role that the writer task and a finishing run's task share.

The order the core decides is the order on the wire: messages go through one outbox, and
whoever writes takes from it while holding ``writing``, then sends what it took as one frame.
"""

from __future__ import annotations

import asyncio
import collections
from typing import Any

from gen_worker.runtime import core_types as ct
from gen_worker.transport.stream import StreamClosed, WorkerStream

__all__ = ["CLOSE", "MAX_FRAME", "Link", "Outbox", "closed_event"]

CLOSE = object()  # the writer's "flush, then close the stream" marker
MAX_FRAME = 512  # messages per frame: bounds one write's size and latency


class Outbox:
    """The ordered messages waiting to be written: a deque and one waiter.

    ``asyncio.Queue`` does its getter/putter bookkeeping per item; a writer takes whatever
    has queued up as one frame anyway.
    """

    def __init__(self) -> None:
        self._items: collections.deque[Any] = collections.deque()
        self._waiter: asyncio.Future[None] | None = None

    def put(self, item: Any) -> None:
        self._items.append(item)
        self._wake()

    def extend(self, items: tuple[Any, ...]) -> None:
        self._items.extend(items)
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    def take(self, limit: int, *, close: bool) -> list[Any]:
        """Up to ``limit`` messages, in order, without waiting. The close marker ends the list
        when ``close``; otherwise the list stops before it (it is the writer task's)."""
        items = self._items
        batch: list[Any] = []
        while items and len(batch) < limit:
            if items[0] is CLOSE:
                if close:
                    batch.append(items.popleft())
                break
            batch.append(items.popleft())
        return batch

    async def wait(self) -> None:
        """Until there is something to take."""
        while not self._items:
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter


class Link:
    """One open stream: its reader and writer tasks, its outbox, its write role."""

    def __init__(self, stream: WorkerStream) -> None:
        self.stream = stream
        self.outbox = Outbox()
        #: Held while taking from the outbox and writing what was taken: by the writer task,
        #: or by a run's task writing its own answer (see Worker._write_now).
        self.writing = asyncio.Lock()
        self.reader: asyncio.Task[None] | None = None
        self.writer: asyncio.Task[None] | None = None
        self.closed = False

    @property
    def tasks(self) -> list[asyncio.Task[None]]:
        return [t for t in (self.reader, self.writer) if t is not None]

    async def write_queued(self, *, close: bool) -> bool:
        """Take what is queued (one frame's worth) and send it; whether the close marker came.

        The caller holds ``writing``. StreamClosed when the stream broke.
        """
        batch = self.outbox.take(MAX_FRAME, close=close)
        closing = bool(batch) and batch[-1] is CLOSE
        messages = batch[:-1] if closing else batch
        if messages:
            await self.stream.send_many(messages)
        return closing


def closed_event(exc: StreamClosed, *, dial: bool) -> ct.Event:
    """What a stream's (or a dial's) ending means to the core."""
    if exc.kind in ("rejected", "unauthenticated"):
        return ct.ProtocolRejected(exc.detail)
    if exc.kind == "redirect":
        return ct.Redirected(exc.address)
    return ct.DialFailed(exc.detail) if dial else ct.StreamBroken(exc.detail)
