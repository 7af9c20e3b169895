"""One timer for the ``*.stuck`` warnings of every phase of every request of an engine.

A ``loop.call_later`` timer per phase (three phases per request, almost always cancelled a few
microseconds later) cost a timer handle, a heap push and a cancellation each, and left the
cancelled handles in the loop's heap until its next clean-up. Here a phase is an entry in a
dict per warning threshold: all phases with the same threshold fall due in the order they
started, so the first entry of each dict is its earliest, and one timer armed at the earliest
of those is enough. A phase that ends just deletes its entry.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable

__all__ = ["StuckWatch"]

#: Called with the seconds the phase has been running when it becomes stuck.
OnStuck = Callable[[float], None]


class StuckWatch:
    """Calls ``on_stuck`` once for each phase still running ``warn_s`` after it started."""

    def __init__(self) -> None:
        # warn_s -> {key: (due, started, on_stuck)} in start order, so in due order.
        self._phases: dict[float, dict[object, tuple[float, float, OnStuck]]] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._timer_due = math.inf

    def __len__(self) -> int:
        return sum(len(phases) for phases in self._phases.values())

    def start(self, key: object, warn_s: float, on_stuck: OnStuck) -> None:
        """Watch the phase ``key`` (any hashable unique to it) from now on."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        due = now + warn_s
        phases = self._phases.get(warn_s)
        if phases is None:
            phases = self._phases[warn_s] = {}
        phases[key] = (due, now, on_stuck)
        if due < self._timer_due:
            self._arm(loop, due)

    def stop(self, key: object, warn_s: float) -> None:
        """The phase ended (its warning, if it has not fired yet, never will)."""
        phases = self._phases.get(warn_s)
        if phases is not None:
            phases.pop(key, None)

    def _arm(self, loop: asyncio.AbstractEventLoop, due: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = loop.call_at(due, self._fire)
        self._timer_due = due

    def _fire(self) -> None:
        self._timer = None
        self._timer_due = math.inf
        loop = asyncio.get_running_loop()
        now = loop.time()
        fired: list[tuple[OnStuck, float]] = []
        earliest = math.inf
        for phases in self._phases.values():
            while phases:
                key = next(iter(phases))
                due, started, on_stuck = phases[key]
                if due > now:
                    earliest = min(earliest, due)
                    break
                del phases[key]
                fired.append((on_stuck, now - started))
        if earliest < math.inf:
            self._arm(loop, earliest)
        for on_stuck, elapsed_s in fired:
            on_stuck(elapsed_s)
