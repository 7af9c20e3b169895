"""The threads sync functions run in, and stopping one that ignores cooperative cancellation.

**The pool.** ``loop.run_in_executor`` costs a ``concurrent.futures.Future``, a work item, a
condition variable, and an ``asyncio.Future`` chained to it with two callbacks, about 100 us a
call on a small machine. :class:`CallThreads` keeps long-lived threads blocked on one
``queue.SimpleQueue`` (a C lock hand-off) and reports each call back with a single
``loop.call_soon_threadsafe``, about half that. A thread is started only when every thread is
busy; the engine's slots bound how many calls run at once, so the pool never outgrows them.

**Stopping.** CPython can raise an exception asynchronously in another thread
(``PyThreadState_SetAsyncExc``): it is delivered at the next bytecode boundary, so it stops
Python loops but not a call blocked inside C code (a sleep, a lock, a CUDA kernel). The engine
therefore keeps the concurrency slot until the thread has really stopped.
"""

from __future__ import annotations

import ctypes
import queue
import threading
from collections.abc import Callable

__all__ = ["CallThreads", "clear_pending_in_thread", "raise_in_thread"]


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


#: A unit of work; it must not raise. What it returns (a report to the loop, say) is called
#: once the pool has counted the job as finished, so that a new job submitted on the strength
#: of that report finds its thread free.
Job = Callable[[], Callable[[], object] | None]


class CallThreads:
    """Long-lived daemon threads running jobs in submission order.

    Daemon threads: a function blocked forever in C code must not keep the process from
    exiting once the engine has reported and given up on it.
    """

    def __init__(self, name_prefix: str = "gen-worker-call") -> None:
        self._jobs: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._outstanding = 0  # submitted and not finished
        self._name_prefix = name_prefix
        self._closed = False

    @property
    def size(self) -> int:
        return len(self._threads)

    def submit(self, job: Job) -> None:
        """Run ``job`` in a pool thread as soon as one is free (one is started if none is)."""
        with self._lock:
            if self._closed:
                raise RuntimeError("the call threads were shut down")
            self._outstanding += 1
            # Every job gets a thread: never more jobs outstanding than threads, so a job
            # never waits behind a function that runs for minutes.
            if self._outstanding > len(self._threads):
                thread = threading.Thread(
                    target=self._work,
                    name=f"{self._name_prefix}-{len(self._threads)}",
                    daemon=True,
                )
                self._threads.append(thread)
                thread.start()
        self._jobs.put(job)

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            then = None
            try:
                then = job()
            except BaseException:
                then = None  # a forced stop delivered late, in the job's own code: keep serving
            finally:
                with self._lock:
                    self._outstanding -= 1
            if then is not None:
                then()

    def shutdown(self) -> None:
        """Let every thread end once it is idle; running jobs are not interrupted."""
        with self._lock:
            self._closed = True
            threads = len(self._threads)
        for _ in range(threads):
            self._jobs.put(None)
