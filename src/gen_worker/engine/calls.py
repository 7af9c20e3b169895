"""Calling the user's function: async ones on the loop, sync ones in a worker thread.

A sync function that ignores cancellation is stopped by raising ``CanceledError`` inside its
thread after a grace period (repeatedly, in case it catches it). The thread is tracked so that
the request's concurrency slot is released only once the function has really returned.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import AsyncIterator, Callable, Iterable
from typing import TYPE_CHECKING, Any

import msgspec

from gen_worker.authoring import FunctionSpec, RequestContext
from gen_worker.engine.codec import FunctionCodec
from gen_worker.engine.emitter import OutcomeChannel
from gen_worker.engine.request import Codec
from gen_worker.engine.threads import clear_pending_in_thread, raise_in_thread
from gen_worker.errors import CanceledError, OutputTooLargeError

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
        self._future: concurrent.futures.Future[Any] | None = None
        self._forced = 0

    async def run(
        self, ctx: RequestContext, payload: msgspec.Struct, models: dict[str, Any]
    ) -> Any:
        """The function's return value (None for a streaming function: deltas went out)."""
        spec = self._spec
        kwargs = {spec.payload_param: payload, **models}
        if spec.is_async and spec.is_streaming:
            await self._async_stream(spec.func(ctx, **kwargs))
            return None
        if spec.is_async:
            return await spec.func(ctx, **kwargs)
        if spec.is_streaming:
            return await self._in_thread(lambda: self._sync_stream(spec.func(ctx, **kwargs)))
        return await self._in_thread(lambda: spec.func(ctx, **kwargs))

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

    def _entry(self, target: Callable[[], Any]) -> Any:
        with self._lock:
            self._thread_id = threading.get_ident()
        try:
            return target()
        finally:
            with self._lock:
                self._thread_id = None
                # A forced stop that arrived too late must not fire in the pool's own code.
                clear_pending_in_thread(threading.get_ident())

    async def _in_thread(self, target: Callable[[], Any]) -> Any:
        executor: concurrent.futures.Executor = self._deps.call_threads()
        self._future = executor.submit(self._entry, target)
        return await asyncio.wrap_future(self._future)

    def stop_thread_later(self) -> None:
        """After the grace period, raise CanceledError in the thread if it is still running."""
        if self._future is not None and not self._future.done():
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
        future = self._future
        if future is None or future.done():
            callback()
            return
        loop = asyncio.get_running_loop()
        future.add_done_callback(lambda _: loop.call_soon_threadsafe(callback))
