"""The request's cancel event: a ``threading.Event`` whose condition variable is made lazily.

Every request gets one (``ctx.cancel_event``), but almost none is ever waited on: functions
poll ``is_canceled()``, and most requests are never canceled. ``threading.Event()`` builds a
``Condition`` around a new ``Lock`` (about 3 us, the largest single cost of starting a request);
this one builds it on the first ``set``/``clear``/``wait``. It is a real ``threading.Event``
subclass with every public method overridden, so it works wherever one is expected.
"""

from __future__ import annotations

import threading

__all__ = ["CancelEvent"]

#: Guards the lazy creation (two threads may be first at the same moment).
_CREATING = threading.Lock()


class CancelEvent(threading.Event):
    def __init__(self) -> None:
        # Deliberately not threading.Event.__init__: the condition is made on first use.
        self._flag = False
        self._condition: threading.Condition | None = None

    def _cond_now(self) -> threading.Condition:
        condition = self._condition
        if condition is None:
            with _CREATING:
                condition = self._condition
                if condition is None:
                    condition = self._condition = threading.Condition(threading.Lock())
        return condition

    def is_set(self) -> bool:
        return self._flag

    def set(self) -> None:
        condition = self._cond_now()
        with condition:
            self._flag = True
            condition.notify_all()

    def clear(self) -> None:
        with self._cond_now():
            self._flag = False

    def wait(self, timeout: float | None = None) -> bool:
        condition = self._cond_now()
        with condition:
            signaled = self._flag
            if not signaled:
                signaled = condition.wait(timeout)
            return signaled

    def _at_fork_reinit(self) -> None:
        if self._condition is not None:
            self._condition._at_fork_reinit()  # type: ignore[attr-defined]  # private, in CPython
