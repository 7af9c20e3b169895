"""Stopping a worker thread that ignores cooperative cancellation.

CPython can raise an exception asynchronously in another thread
(``PyThreadState_SetAsyncExc``): it is delivered at the next bytecode boundary, so it stops
Python loops but not a call blocked inside C code (a sleep, a lock, a CUDA kernel). The engine
therefore keeps the concurrency slot until the thread has really stopped.
"""

from __future__ import annotations

import ctypes

__all__ = ["clear_pending_in_thread", "raise_in_thread"]


def raise_in_thread(thread_id: int, exc_type: type[BaseException]) -> bool:
    """Schedule ``exc_type`` in thread ``thread_id``; False if no such thread is running."""
    count = ctypes.pythonapi.PyThreadState_SetAsyncExc(
        ctypes.c_ulong(thread_id), ctypes.py_object(exc_type)
    )
    if count > 1:  # more than one thread matched: undo, as the C API documentation requires
        ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread_id), None)
        return False
    return bool(count == 1)


def clear_pending_in_thread(thread_id: int) -> None:
    """Withdraw an exception scheduled by :func:`raise_in_thread` that was not delivered yet."""
    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread_id), None)
