"""One request from payload bytes to its terminal outcome.

Phases, each reported with lifecycle events: decode (before queueing, so bad input fails
fast) -> wait for a slot -> fetch input assets -> resolve and load models -> call the function
-> persist output assets and encode the output. Cancellation (interrupt, deadline, shutdown)
reports its outcome at once; the concurrency slot is released only when the function has
really stopped (see :mod:`gen_worker.engine.calls`).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec

from gen_worker.authoring import (
    Asset,
    ContextHooks,
    FunctionSpec,
    OutputSink,
    OutputStream,
    RequestContext,
    Tensors,
)
from gen_worker.config import EngineSettings
from gen_worker.engine.calls import FunctionCall
from gen_worker.engine.cancel import CancelEvent
from gen_worker.engine.codec import FunctionCodec
from gen_worker.engine.emitter import OutcomeChannel
from gen_worker.engine.failures import canceled_failure, failure_from_exception, timeout_failure
from gen_worker.engine.models import ModelProvider
from gen_worker.engine.outcomes import Result
from gen_worker.engine.phases import (
    CACHE_ORDER,
    ModelsLoaded,
    call_with_oom_retry,
    load_models,
    release_models,
)
from gen_worker.engine.request import RequestMeta
from gen_worker.engine.slots import FifoSlots
from gen_worker.engine.threads import CallThreads
from gen_worker.engine.watch import StuckWatch
from gen_worker.errors import GenWorkerError, OutputTooLargeError, ValidationError
from gen_worker.files import AssetFetcher, find_assets
from gen_worker.low_vram.events import use_event_sink

__all__ = ["InputTooLargeError", "RequestRun", "RunDeps"]


class InputTooLargeError(ValidationError):
    reason = "input_too_large"


@dataclass(frozen=True, slots=True)
class RunDeps:
    """What every request of one engine shares."""

    settings: EngineSettings
    slots: FifoSlots
    call_threads: Callable[[], CallThreads]
    models: ModelProvider | None
    outputs: Callable[[RequestMeta], OutputSink] | None
    assets: AssetFetcher | None
    cancel_grace_s: float
    device: str
    preferred_batch_size: Callable[[str], int]
    #: The one timer behind every phase's ``*.stuck`` warning.
    watch: StuckWatch


#: The millisecond last formatted by _now_rfc3339 and its text; the second of the text before
#: it and that second's text.
_CLOCK: list[Any] = [-1, "", -1, ""]


def _now_rfc3339(now: Callable[[], float] = time.time) -> str:
    """RFC 3339 UTC with milliseconds (``2026-01-02T03:04:05.678Z``), for ``metrics.compute.*``.

    ``datetime.now(UTC).isoformat(...)`` costs a few microseconds and is asked twice per
    request; the date and time up to the second change once a second, and the whole text once
    a millisecond, so both are cached.
    """
    t = now()
    second = int(t)
    millis = int((t - second) * 1000)
    key = second * 1000 + millis
    if key != _CLOCK[0]:
        if second != _CLOCK[2]:
            _CLOCK[3] = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
            _CLOCK[2] = second
        _CLOCK[1] = f"{_CLOCK[3]}.{millis:03d}Z"
        _CLOCK[0] = key
    text: str = _CLOCK[1]
    return text


class RequestRun:
    """A running request: its outcome channel, its cancellation, and its phases."""

    def __init__(
        self,
        deps: RunDeps,
        spec: FunctionSpec,
        codec: FunctionCodec,
        payload: bytes,
        meta: RequestMeta,
        *,
        own_task: bool = True,
    ) -> None:
        self.spec = spec
        self.meta = meta
        self.request_id = meta.request_id
        self.channel = OutcomeChannel(asyncio.get_running_loop())
        self.cancel_event: threading.Event = CancelEvent()
        self._deps = deps
        self._codec = codec
        self._payload_bytes = payload
        self._received = time.monotonic()
        self._timing: dict[str, float] = {}
        timeout_ms = meta.timeout_ms
        self.timeout_s = timeout_ms / 1000 if timeout_ms is not None else spec.timeout_s
        # A plain async function is awaited right here (_infer); the rest (threads, streams)
        # needs FunctionCall's machinery.
        self._call: FunctionCall | None = None
        if not spec.is_async or spec.is_streaming:
            self._call = FunctionCall(
                spec,
                codec=codec,
                wire_codec=meta.codec,
                channel=self.channel,
                cancel_event=self.cancel_event,
                deps=deps,
            )
        self._holds_slot = False
        self._begun = False
        self.stopped = asyncio.Event()
        self._deadline: asyncio.TimerHandle | None = None
        self._task: asyncio.Task[Any] | None = None
        self._in_caller = not own_task
        if own_task:
            self._task = asyncio.get_running_loop().create_task(self._main(), name=meta.request_id)

    async def execute(self) -> None:
        """Run the request in the calling task, for a run made with ``own_task=False``.

        A transport that just awaits the end of one request (the dev runner's JSON answer)
        saves a task and a loop round trip per request this way. ``cancel()`` then cancels the
        caller's task at its current await inside the run; the run absorbs that cancellation
        (and withdraws it from the task), so the caller goes on to answer ``canceled``. A
        cancellation from anywhere else (a server shutting down) is reported as ``canceled``
        and goes on to end the caller.
        """
        if not self._in_caller or self._begun or self._task is not None:
            raise RuntimeError(f"request {self.request_id} already runs in a task")
        self._task = asyncio.current_task()
        await self._main()

    # -- control ------------------------------------------------------------------------------

    @property
    def is_queued(self) -> bool:
        """Still waiting for a concurrency slot (an interrupt may be meant for these only)."""
        return not self._holds_slot and not self.is_finished

    @property
    def is_finished(self) -> bool:
        return self.channel.terminal is not None

    def cancel(self, *, timeout: bool = False) -> bool:
        """Cancel now (on the loop thread); False when the request had already ended."""
        if not self._report_end(timeout=timeout):
            return False
        # A run that has not begun needs no task cancel (one canceled before its first step
        # would never run its clean-up): it sees that it has ended as it begins.
        if self._task is not None and self._begun:
            self._task.cancel()
        return True

    def _report_end(self, *, timeout: bool) -> bool:
        """Report ``canceled`` (or ``timeout``) now and tell the function to stop."""
        if self.is_finished:
            return False
        reason = "timeout" if timeout else "canceled"
        # Its metrics.job too (one per run, however it ended): what the run got to, and how
        # long each phase it went through took.
        self.channel.emit_many(
            (
                ("metrics.job", {**self._job_metrics(), "error_type": reason}),
                ("request.canceled", {"function_name": self.spec.name, "reason": reason}),
            )
        )
        timing = self._timing_ms()
        rid = self.request_id
        ended = self.channel.finish(
            (
                lambda seq: timeout_failure(
                    seq=seq, request_id=rid, timeout_s=self.timeout_s or 0, timing_ms=timing
                )
            )
            if timeout
            else (lambda seq: canceled_failure(seq=seq, request_id=rid, timing_ms=timing))
        )
        if not ended:
            return False
        self.cancel_event.set()
        if self._call is not None:
            self._call.stop_thread_later()
        return True

    # -- phases ---------------------------------------------------------------------------------

    async def _main(self) -> None:
        self._begun = True
        if self.is_finished:  # canceled before it began
            self._after()
            return
        self.channel.emit("request.received", {"function_name": self.spec.name})
        if self.timeout_s is not None:
            loop = asyncio.get_running_loop()
            self._deadline = loop.call_later(self.timeout_s, lambda: self.cancel(timeout=True))
        try:
            await self._phases()
        except asyncio.CancelledError:
            if not self.is_finished:
                # Not our cancel(): the task itself is being canceled (a shutdown). Report it,
                # and let the cancellation go on ending the task.
                self._report_end(timeout=False)
                raise
            # cancel() already reported the outcome.
            if self._in_caller and self._task is not None:
                self._task.uncancel()  # the caller's task goes on: it answers the request
        except BaseException as exc:  # every failure must end as exactly one outcome
            self._fail(exc)
        finally:
            if self._deadline is not None:
                self._deadline.cancel()
            self._after()

    async def _phases(self) -> None:
        payload = self._decode()
        queued = time.monotonic()
        slots = self._deps.slots
        if not slots.try_acquire():  # a free slot is taken without a coroutine round trip
            await slots.acquire()
        self._holds_slot = True
        self._timing["queue_ms"] = (time.monotonic() - queued) * 1000
        self.channel.emit_many(
            (
                ("request.started", {"function_name": self.spec.name}),
                ("metrics.compute.started", {"at": _now_rfc3339()}),
            )
        )
        # Assets, models and output files are rare: skipped without creating coroutines.
        if self._codec.payload_may_hold_assets:
            await self._fetch_assets(payload)
        kwargs = await self._load_models(payload) if self.spec.injections else {}
        ctx = self._context()
        output = await self._infer(ctx, payload, kwargs)
        if self.spec.is_streaming:
            data = b""
        elif self._codec.output_may_hold_assets:
            data = await self._encode(output)
        else:
            data = self._encode_output(output)
        # Saved outputs may still be uploading (the worker's file API sink): the result goes
        # out only once they have landed, and a failed upload fails the request.
        finish = getattr(self._sink_cache, "finish", None)
        if finish is not None:
            await finish()
        self._succeed(data)

    def _decode(self) -> msgspec.Struct:
        limit = self._deps.settings.max_input_bytes
        size = len(self._payload_bytes)
        if limit is not None and size > limit:
            raise InputTooLargeError(
                f"payload is {size} bytes, above the limit of {limit} bytes "
                "(WORKER_MAX_INPUT_BYTES)"
            )
        return self._codec.decode(self._payload_bytes, self.meta.codec)

    async def _fetch_assets(self, payload: msgspec.Struct) -> None:
        if not self._codec.payload_may_hold_assets:
            return
        assets = find_assets(payload)
        if not assets:
            return
        for asset in assets:
            asset.local_path = None  # never trust a caller-supplied path
        if self._deps.assets is None:
            raise ValidationError("this worker cannot fetch input files (no asset fetcher)")
        start = time.monotonic()
        self._fetched_inputs = True
        meta = self.meta
        files = (meta.file_base_url, meta.file_token or "") if meta.file_base_url else None
        await self._deps.assets.fetch_all(assets, self.request_id, files)
        self._metric("metrics.fetch", "fetch_ms", start)

    async def _load_models(self, payload: msgspec.Struct) -> dict[str, Any]:
        models = self._deps.models
        if models is None:
            raise GenWorkerError(
                f"function '{self.spec.name}' needs models but none are configured"
            )
        self._holds_models = True
        start = time.monotonic()
        loaded = ModelsLoaded()
        try:
            await load_models(
                models, self.spec, payload, loaded, holder=self, device=self._deps.device,
                resolved=self.meta.resolved_models, channel=self.channel,
                watch=self._deps.watch, settings=self._deps.settings,
            )  # fmt: skip
        finally:
            self._models = loaded.ids or None
            self._cache_states = loaded.cache_states or None
        self._metric("metrics.gpu_load", "model_load_ms", start)
        return loaded.kwargs

    async def _infer(
        self, ctx: RequestContext, payload: msgspec.Struct, kwargs: dict[str, Any]
    ) -> Any:
        # The inference phase written out (what _Phase does for the model phases): every
        # request has one, and the context manager's calls showed in a no-op's profile.
        channel = self.channel
        watch = self._deps.watch
        warn_s = self._deps.settings.warn_inference_s
        channel.emit("request.inference.started", {})
        start = time.monotonic()
        watch.start(self, warn_s, self._inference_stuck)
        call = self._call
        try:
            if kwargs:
                output = await self._infer_with_models(ctx, payload, kwargs)
            elif call is None:
                kwargs[self.spec.payload_param] = payload
                output = await self.spec.func(ctx, **kwargs)
            else:
                output = await call.run(ctx, payload, kwargs)
        except BaseException as exc:
            watch.stop(self, warn_s)
            if not isinstance(exc, asyncio.CancelledError):
                ms = round((time.monotonic() - start) * 1000, 3)
                failed = {"ms": ms, "error": type(exc).__name__}
                channel.emit("request.inference.failed", failed)
            raise
        watch.stop(self, warn_s)
        ms = (time.monotonic() - start) * 1000
        self._timing["inference_ms"] = ms
        ms = round(ms, 3)
        channel.emit_many(
            (("request.inference.completed", {"ms": ms}), ("metrics.inference", {"ms": ms}))
        )
        return output

    async def _infer_with_models(
        self, ctx: RequestContext, payload: msgspec.Struct, kwargs: dict[str, Any]
    ) -> Any:
        """The call with injected models: ladder events reach this request, and a
        single-output call that runs out of GPU memory is retried a step down the ladder."""
        call = self._call
        spec = self.spec
        sink = self.channel.hook

        async def once() -> Any:
            if call is not None:
                return await call.run(ctx, payload, kwargs, event_sink=sink)
            with use_event_sink(sink):
                return await spec.func(ctx, **{spec.payload_param: payload, **kwargs})

        if spec.is_streaming or self._deps.models is None:
            return await once()  # deltas already sent cannot be taken back: no retry
        return await call_with_oom_retry(
            once, models=self._deps.models, loaded=kwargs, emit=sink, function_name=spec.name
        )

    def _inference_stuck(self, elapsed_s: float) -> None:
        self.channel.emit("request.inference.stuck", {"elapsed_s": round(elapsed_s, 3)})

    async def _encode(self, output: Any) -> bytes:
        if self.spec.is_streaming:
            return b""
        sink = self._sink() if self._codec.output_may_hold_assets else None
        if sink is not None and find_assets(output):
            await asyncio.to_thread(_persist_output_assets, output, sink)
        return self._encode_output(output)

    def _encode_output(self, output: Any) -> bytes:
        data = self._codec.encode(output, self.meta.codec)
        limit = self._deps.settings.max_output_bytes
        if limit is not None and len(data) > limit:
            raise OutputTooLargeError(len(data), limit)
        return data

    # -- helpers ------------------------------------------------------------------------------

    def _context(self) -> RequestContext:
        meta = self.meta
        deadline = self._received + self.timeout_s if self.timeout_s is not None else None
        hooks = ContextHooks(
            emit=self.channel.hook,
            outputs=_LazySink(self._sink) if self._deps.outputs is not None else None,
            preferred_batch_size=lambda: self._deps.preferred_batch_size(self.spec.name),
            prefetch_depth=lambda: self.spec.resources.prefetch_depth or 0,
        )
        return RequestContext(
            request_id=meta.request_id, function_name=self.spec.name, job_id=meta.job_id,
            owner=meta.owner, invoker_id=meta.invoker_id, release_id=meta.release_id,
            parent_request_id=meta.parent_request_id, child_request_id=meta.child_request_id,
            item_id=meta.item_id, item_index=meta.item_index, device=self._deps.device,
            timeout_ms=meta.timeout_ms, deadline=deadline, cancel_event=self.cancel_event,
            resolved_models=meta.resolved_models, required_models=meta.required_models,
            hooks=hooks,
        )  # fmt: skip

    #: Called once the run has stopped (the engine forgets it then).
    stopped_callback: Callable[[], object] | None = None
    _stop_listeners: list[Callable[[], object]] | None = None

    def on_stopped(self, callback: Callable[[], object]) -> None:
        """Call ``callback`` (on the loop) once the run has stopped: its slot is free and its
        function has returned. Called at once if it has already stopped."""
        if self.stopped.is_set():
            callback()
        elif self._stop_listeners is None:
            self._stop_listeners = [callback]
        else:
            self._stop_listeners.append(callback)

    _sink_cache: OutputSink | None = None
    _fetched_inputs = False
    _holds_models = False
    _models: dict[str, str] | None = None
    _cache_states: dict[str, str | None] | None = None

    def _sink(self) -> OutputSink | None:
        if self._sink_cache is None and self._deps.outputs is not None:
            self._sink_cache = self._deps.outputs(self.meta)
        return self._sink_cache

    def _metric(self, event_type: str, timing_key: str, start: float) -> None:
        ms = (time.monotonic() - start) * 1000
        self._timing[timing_key] = ms
        self.channel.emit(event_type, {"ms": round(ms, 3)})

    def _timing_ms(self) -> dict[str, float]:
        return {**self._timing, "total_ms": (time.monotonic() - self._received) * 1000}

    def _succeed(self, data: bytes) -> None:
        self.channel.emit_many(
            (
                ("metrics.job", self._job_metrics()),
                ("metrics.compute.completed", {"at": _now_rfc3339()}),
                ("request.completed", {"function_name": self.spec.name}),
            )
        )
        timing = self._timing_ms()
        self.channel.finish(lambda seq: Result(seq, data, timing))

    def _fail(self, exc: BaseException) -> None:
        if self.is_finished:
            return
        error_type = getattr(exc, "error_type", "internal")
        # One metrics.job per run, failed ones included: a failed load still says how cold
        # its models were and how long each phase took.
        self.channel.emit_many(
            (
                ("metrics.job", {**self._job_metrics(), "error_type": error_type}),
                ("request.failed", {"error_type": error_type}),
            )
        )
        timing = self._timing_ms()
        name = self.spec.name
        self.channel.finish(
            lambda seq: failure_from_exception(exc, seq=seq, function=name, timing_ms=timing)
        )

    def _job_metrics(self) -> dict[str, Any]:
        """The payload of ``metrics.job``."""
        payload: dict[str, Any] = {
            "schema_version": 1,
            "function_name": self.spec.name,
            "models": dict(self._models) if self._models else {},
        }
        for key, value in self._timing.items():
            payload[key] = round(value, 3)
        if self.spec.is_streaming:
            payload["deltas"] = self.channel.delta_count
        states = [s for s in (self._cache_states or {}).values() if s is not None]
        if states:
            # The request was as cold as its coldest model.
            payload["cache_state"] = max(states, key=CACHE_ORDER.index)
            payload["model_cache_states"] = dict(self._cache_states or {})
        return payload

    def _after(self) -> None:
        """Release the slot once the function has really stopped, then mark the run stopped."""
        if self._fetched_inputs and self._deps.assets is not None:
            self._deps.assets.cleanup(self.request_id)

        if self._call is None:
            self._release()
        else:
            self._call.when_stopped(self._release)

    def _release(self) -> None:
        if self._holds_models:
            self._holds_models = False
            release_models(self._deps.models, self)
        if self._holds_slot:
            self._holds_slot = False
            self._deps.slots.release()
        self.stopped.set()
        callback, self.stopped_callback = self.stopped_callback, None
        listeners, self._stop_listeners = self._stop_listeners, None
        # The task's coroutine and these callbacks refer back to this run: let go of them so
        # refcounting frees a finished run instead of the cycle collector.
        self._task = None
        if callback is not None:
            callback()
        for listener in listeners or ():
            listener()


class _LazySink:
    """The request's output sink, built on first use: most requests save no files."""

    def __init__(self, make: Callable[[], OutputSink | None]) -> None:
        self._make = make

    def _get(self) -> OutputSink:
        sink = self._make()
        assert sink is not None  # only built when the engine has an output sink factory
        return sink

    def save_bytes(self, ref: str, data: bytes) -> Asset:
        return self._get().save_bytes(ref, data)

    def save_file(self, ref: str, local_path: Path) -> Asset:
        return self._get().save_file(ref, local_path)

    def open_stream(self, ref: str) -> OutputStream:
        return self._get().open_stream(ref)

    def save_checkpoint(self, ref: str, local_path: Path, format: str) -> Tensors:
        return self._get().save_checkpoint(ref, local_path, format)

    def save_checkpoint_bytes(self, ref: str, data: bytes, format: str) -> Tensors:
        return self._get().save_checkpoint_bytes(ref, data, format)


def _persist_output_assets(output: Any, sink: OutputSink) -> None:
    """Returned local files become outputs: an Asset with a local_path and no ref is saved."""
    for asset in find_assets(output):
        if asset.ref is None and asset.local_path is not None:
            path = Path(asset.local_path)
            saved = sink.save_file(path.name, path)
            for field in ("ref", "size_bytes", "sha256", "blake3", "mime_type", "local_path"):
                setattr(asset, field, getattr(saved, field))
