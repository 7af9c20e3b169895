"""A first-in-first-out concurrency limit with a bounded waiting line.

``asyncio.Semaphore`` does not promise that waiters are served in arrival order, and it has
no queue bound; a request beyond the limit must wait in order and never be dropped, and one
beyond the queue bound must be told at once that the worker is busy.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque

from gen_worker.errors import BusyError

__all__ = ["FifoSlots"]


class FifoSlots:
    """``limit`` slots; waiters are served in arrival order; at most ``max_waiting`` wait."""

    def __init__(self, limit: int, *, max_waiting: int | None = None) -> None:
        if limit < 1:
            raise ValueError(f"limit must be >= 1, got {limit}")
        self._limit = limit
        self._max_waiting = max_waiting
        self._in_use = 0
        self._waiters: deque[asyncio.Future[None]] = deque()

    @property
    def limit(self) -> int:
        return self._limit

    @property
    def in_use(self) -> int:
        return self._in_use

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def try_acquire(self) -> bool:
        """Take a free slot now if nobody waits for one; False otherwise (then ``acquire``)."""
        if self._in_use < self._limit and not self._waiters:
            self._in_use += 1
            return True
        return False

    async def acquire(self) -> None:
        """Take a slot, waiting in line; cancellation leaves the line cleanly."""
        if self.try_acquire():
            return
        if self._max_waiting is not None and len(self._waiters) >= self._max_waiting:
            raise BusyError(
                f"all {self._limit} slots are busy and {len(self._waiters)} requests are "
                "already waiting; retry later"
            )
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                # The slot was handed to us just as we were canceled: pass it on.
                self.release()
            else:
                # release() may already have dropped our cancelled future from the line.
                with contextlib.suppress(ValueError):
                    self._waiters.remove(waiter)
            raise

    def release(self) -> None:
        """Give a slot back, handing it straight to the longest waiter if there is one."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # the slot moves to the waiter; _in_use is unchanged
                return
        self._in_use -= 1
