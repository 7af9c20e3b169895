"""Calling the user's function: async ones on the loop, sync ones in a worker thread.

A sync function that ignores cancellation is stopped by raising ``CanceledError`` inside its
thread after a grace period (repeatedly, in case it catches it). The thread is tracked so that
the request's concurrency slot is released only once the function has really returned.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import threading
from collections.abc import AsyncIterator, Callable, Iterable
from typing import TYPE_CHECKING, Any

import msgspec

from gen_worker.authoring import FunctionSpec, RequestContext
from gen_worker.engine.codec import FunctionCodec
from gen_worker.engine.emitter import OutcomeChannel
from gen_worker.engine.request import Codec
from gen_worker.engine.threads import CallThreads, clear_pending_in_thread, raise_in_thread
from gen_worker.errors import CanceledError, OutputTooLargeError
from gen_worker.low_vram.events import use_event_sink

if TYPE_CHECKING:
    from gen_worker.engine.run import RunDeps

__all__ = ["FunctionCall"]

#: How many times a thread that swallows CanceledError gets it again before we give up.
_MAX_FORCED_STOPS = 20


class FunctionCall:
    def __init__(
        self,
        spec: FunctionSpec,
        *,
        codec: FunctionCodec,
        wire_codec: Codec,
        channel: OutcomeChannel,
        cancel_event: threading.Event,
        deps: RunDeps,
    ) -> None:
        self._spec = spec
        self._codec = codec
        self._wire = wire_codec
        self._channel = channel
        self._cancel_event = cancel_event
        self._deps = deps
        self._lock = threading.Lock()
        self._thread_id: int | None = None
        self._in_flight = False  # a pool thread runs (or is about to run) this call
        self._when_stopped: list[Callable[[], None]] = []
        self._forced = 0

    async def run(
        self,
        ctx: RequestContext,
        payload: msgspec.Struct,
        models: dict[str, Any],
        *,
        event_sink: Callable[[str, dict[str, Any]], None] | None = None,
    ) -> Any:
        """The function's return value (None for a streaming function: deltas went out).

        ``event_sink`` (functions with injected models) is where the low-VRAM ladder's events
        go while the function runs, in whatever thread it runs.
        """
        spec = self._spec
        kwargs = {spec.payload_param: payload, **models}
        if event_sink is not None:
            with use_event_sink(event_sink):
                return await self._run(ctx, kwargs, event_sink)
        return await self._run(ctx, kwargs, None)

    async def _run(
        self,
        ctx: RequestContext,
        kwargs: dict[str, Any],
        event_sink: Callable[[str, dict[str, Any]], None] | None,
    ) -> Any:
        spec = self._spec
        if spec.is_async and spec.is_streaming:
            await self._async_stream(spec.func(ctx, **kwargs))
            return None
        if spec.is_async:
            return await spec.func(ctx, **kwargs)

        def in_sink(target: Callable[[], Any]) -> Callable[[], Any]:
            if event_sink is None:
                return target

            def wrapped() -> Any:
                with use_event_sink(event_sink):
                    return target()

            return wrapped

        if spec.is_streaming:
            return await self._in_thread(
                in_sink(lambda: self._sync_stream(spec.func(ctx, **kwargs)))
            )
        return await self._in_thread(in_sink(lambda: spec.func(ctx, **kwargs)))

    # -- deltas -------------------------------------------------------------------------------

    def _encode_delta(self, item: Any) -> bytes:
        data = self._codec.encode(item, self._wire, what="yielded")
        limit = self._deps.settings.max_output_bytes
        if limit is not None and len(data) > limit:
            raise OutputTooLargeError(len(data), limit)
        return data

    def _sync_stream(self, items: Iterable[Any]) -> None:
        iterator = iter(items)
        try:
            for item in iterator:
                self._channel.delta(self._encode_delta(item))
                if self._cancel_event.is_set():
                    break  # stop pulling: a canceled stream ends at the next delta
        finally:
            close = getattr(iterator, "close", None)
            if close is not None:
                close()

    async def _async_stream(self, items: AsyncIterator[Any]) -> None:
        try:
            async for item in items:
                self._channel.delta(self._encode_delta(item))
                if self._cancel_event.is_set():
                    break
        finally:
            aclose = getattr(items, "aclose", None)
            if aclose is not None:
                await aclose()

    # -- the worker thread ----------------------------------------------------------------------

    async def _in_thread(self, target: Callable[[], Any]) -> Any:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._in_flight = True
        threads: CallThreads = self._deps.call_threads()
        threads.submit(functools.partial(self._entry, target, loop, future))
        return await future

    def _entry(
        self, target: Callable[[], Any], loop: asyncio.AbstractEventLoop, future: Any
    ) -> Callable[[], None]:
        """In a pool thread: run ``target``; the report to send back (one loop wake-up).

        The pool sends the report once it counts this thread as free again. It goes through
        ``call_soon_threadsafe`` like the deltas and progress the function posted, so it
        reaches the loop after them (FIFO).
        """
        result: Any = None
        error: BaseException | None = None
        thread_id = threading.get_ident()
        try:
            with self._lock:
                self._thread_id = thread_id
            result = target()
        except BaseException as exc:  # reported to the awaiting run, whatever it is
            error = exc
        finally:
            self._leave_thread(thread_id)
        # No forced stop can arrive from here on (_leave_thread withdrew any): the report
        # is sure to be sent.
        return functools.partial(self._report, loop, future, result, error)

    def _report(
        self,
        loop: asyncio.AbstractEventLoop,
        future: Any,
        result: Any,
        error: BaseException | None,
    ) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
            loop.call_soon_threadsafe(self._returned, future, result, error)

    def _leave_thread(self, thread_id: int) -> None:
        # A forced stop that arrived too late must not fire in the pool's own code; if it
        # fires while we withdraw it, it was delivered: withdraw again until none is pending.
        # Forced stops are only raised under the lock while _thread_id is set, so a call that
        # was never forced (nearly all) has nothing to withdraw and skips the C API call.
        while True:
            try:
                with self._lock:
                    self._thread_id = None
                    if self._forced:
                        clear_pending_in_thread(thread_id)
                return
            except BaseException:
                continue  # that was the late CanceledError itself

    def _returned(
        self, future: asyncio.Future[Any], result: Any, error: BaseException | None
    ) -> None:
        self._in_flight = False
        if not future.done():  # done: the run was canceled and stopped waiting
            if error is None:
                future.set_result(result)
            elif isinstance(error, StopIteration):  # a Future refuses StopIteration itself
                future.set_exception(RuntimeError(f"the function raised StopIteration: {error}"))
            else:
                future.set_exception(error)
        callbacks, self._when_stopped = self._when_stopped, []
        for callback in callbacks:
            callback()

    def stop_thread_later(self) -> None:
        """After the grace period, raise CanceledError in the thread if it is still running."""
        if self._in_flight:
            loop = asyncio.get_running_loop()
            loop.call_later(self._deps.cancel_grace_s, self._force_stop)

    def _force_stop(self) -> None:
        with self._lock:
            if self._thread_id is None or self._forced >= _MAX_FORCED_STOPS:
                return
            raise_in_thread(self._thread_id, CanceledError)
            self._forced += 1
        asyncio.get_running_loop().call_later(self._deps.cancel_grace_s, self._force_stop)

    def when_stopped(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` on the loop once no thread of this call is running."""
        if self._in_flight:
            self._when_stopped.append(callback)
        else:
            callback()
