"""One open stream to the scheduler, as the worker shell uses it: an ordered outbox and a
write role that the writer task and a finishing run's task share.

The order the core decides is the order on the wire: messages go through one outbox, and
whoever writes takes from it while holding ``writing``, then sends what it took as one frame.
Also here: the bookkeeping of a run that the reader task executes itself (``InlineRun``; the
reading passes to another task whenever the reader is held up) and the heartbeat.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable
from typing import Any

from gen_worker.engine import Outcome, RequestRun
from gen_worker.runtime import core_types as ct
from gen_worker.transport.stream import StreamClosed, WorkerStream

__all__ = [
    "CLOSE",
    "MAX_FRAME",
    "SLOW_WRITE_S",
    "Heartbeat",
    "InlineRun",
    "Link",
    "Outbox",
    "closed_event",
]

CLOSE = object()  # the writer's "flush, then close the stream" marker
MAX_FRAME = 512  # messages per frame: bounds one write's size and latency
#: How long the reader task may be held up writing a run's answer before another task takes
#: over the reading (a write waits when the scheduler does not take what is sent).
SLOW_WRITE_S = 0.005


class Outbox:
    """The ordered messages waiting to be written: a deque and one waiter.

    ``asyncio.Queue`` does its getter/putter bookkeeping per item; a writer takes whatever
    has queued up as one frame anyway.
    """

    def __init__(self) -> None:
        self._items: collections.deque[Any] = collections.deque()
        self._waiter: asyncio.Future[None] | None = None

    def __len__(self) -> int:
        return len(self._items)

    def put(self, item: Any) -> None:
        self._items.append(item)
        self.wake()

    def extend(self, items: tuple[Any, ...], *, wake: bool = True) -> None:
        """Queue ``items``; ``wake=False`` when the caller is about to write them itself."""
        self._items.extend(items)
        if wake:
            self.wake()

    def wake(self) -> None:
        """Wake the waiting writer, if there is one."""
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
        # The reader task writing a run's answer itself, since when, and the one timer that
        # checks it is not held up there for long (see SLOW_WRITE_S).
        self._answering = False
        self._answer_since = 0.0
        self._answer_watch: asyncio.TimerHandle | None = None

    def answering(self, read_elsewhere: Callable[[Link], None]) -> None:
        """The reader task starts writing a run's answer: past SLOW_WRITE_S, another reads."""
        loop = asyncio.get_running_loop()
        self._answering = True
        self._answer_since = loop.time()
        if self._answer_watch is None:  # one timer for many answers, not one each
            due = self._answer_since + SLOW_WRITE_S
            self._answer_watch = loop.call_at(due, self._check_answer, read_elsewhere)

    def answered(self) -> None:
        self._answering = False

    def _check_answer(self, read_elsewhere: Callable[[Link], None]) -> None:
        self._answer_watch = None
        if not self._answering or self.closed:
            return  # nothing is being written now; the next answer arms the timer again
        loop = asyncio.get_running_loop()
        due = self._answer_since + SLOW_WRITE_S
        if loop.time() >= due:
            read_elsewhere(self)  # held up: the reading goes on in another task
        else:  # a later answer than the one this timer was armed for: check when it is due
            self._answer_watch = loop.call_at(due, self._check_answer, read_elsewhere)

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
        if not close and self.outbox:
            # A run's own write takes one frame; its answer may be longer (a stream that never
            # waited), and what was queued quietly has no one else to wake the writer for it.
            self.outbox.wake()
        return closing


class InlineRun:
    """A job request's run that the reader task executes itself (see ``Worker._execute``).

    Its outcome sink is not attached to the channel up front: a run that ends without
    waiting hands everything over in one batch once it is over, and only a run that has to
    wait gets the sink attached (so its outcomes flow while it waits) and another task reads.
    """

    __slots__ = ("attached", "executing", "key", "run", "sink", "stopped")

    def __init__(self, key: ct.RequestKey, run: RequestRun, sink: Callable[..., None]) -> None:
        self.key = key
        self.run = run
        #: Takes a batch of outcomes (``quiet=True``: the caller writes them right after).
        self.sink = sink
        self.executing = False  # inside run.execute() in the reader task
        self.attached = False  # the sink is attached to the channel
        self.stopped = False  # the run stopped while executing; its JobStopped is still due

    def attach(self) -> None:
        if not self.attached:
            self.attached = True
            self.run.channel.attach(self.sink)

    def take(self) -> list[Outcome]:
        """What the run posted while no sink was attached (nothing once one is)."""
        return [] if self.attached else self.run.channel.take_nowait()

    def first_wait(self, read_elsewhere: Callable[[Link], None], link: Link) -> None:
        """Called soon after the reader task first waits: if that is inside the run (one
        that takes its time), its outcomes must flow meanwhile and another task must read;
        if it is in the write of the answer, this task reads on once that is written."""
        if self.executing:
            self.attach()
            read_elsewhere(link)


class Heartbeat:
    """Every ``interval_s`` once started, ``send(make())`` (on whatever stream is current)."""

    def __init__(self, make: Callable[[], Any], send: Callable[[Any], None]) -> None:
        self._make = make
        self._send = send
        self._task: asyncio.Task[None] | None = None

    def start(self, interval_s: float) -> None:
        self.stop()
        self._task = asyncio.create_task(self._beat(interval_s))

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None

    async def _beat(self, interval_s: float) -> None:
        while True:
            await asyncio.sleep(interval_s)
            self._send(self._make())


def closed_event(exc: StreamClosed, *, dial: bool) -> ct.Event:
    """What a stream's (or a dial's) ending means to the core."""
    if exc.kind in ("rejected", "unauthenticated"):
        return ct.ProtocolRejected(exc.detail)
    if exc.kind == "redirect":
        return ct.Redirected(exc.address)
    return ct.DialFailed(exc.detail) if dial else ct.StreamBroken(exc.detail)
