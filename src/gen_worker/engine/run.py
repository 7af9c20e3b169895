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
from datetime import UTC, datetime
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
from gen_worker.engine.codec import FunctionCodec
from gen_worker.engine.emitter import OutcomeChannel
from gen_worker.engine.failures import canceled_failure, failure_from_exception, timeout_failure
from gen_worker.engine.models import ModelProvider
from gen_worker.engine.outcomes import Result
from gen_worker.engine.request import RequestMeta
from gen_worker.engine.slots import FifoSlots
from gen_worker.errors import GenWorkerError, OutputTooLargeError, ValidationError
from gen_worker.files import AssetFetcher, find_assets

__all__ = ["InputTooLargeError", "RequestRun", "RunDeps"]


class InputTooLargeError(ValidationError):
    reason = "input_too_large"


@dataclass(frozen=True, slots=True)
class RunDeps:
    """What every request of one engine shares."""

    settings: EngineSettings
    slots: FifoSlots
    call_threads: Callable[[], Any]
    models: ModelProvider | None
    outputs: Callable[[str], OutputSink] | None
    assets: AssetFetcher | None
    cancel_grace_s: float
    device: str
    preferred_batch_size: Callable[[str], int]


def _now_rfc3339() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class RequestRun:
    """A running request: its outcome channel, its cancellation, and its phases."""

    def __init__(
        self,
        deps: RunDeps,
        spec: FunctionSpec,
        codec: FunctionCodec,
        payload: bytes,
        meta: RequestMeta,
    ) -> None:
        self.spec = spec
        self.meta = meta
        self.request_id = meta.request_id
        self.channel = OutcomeChannel(asyncio.get_running_loop())
        self.cancel_event = threading.Event()
        self._deps = deps
        self._codec = codec
        self._payload_bytes = payload
        self._received = time.monotonic()
        self._timing: dict[str, float] = {}
        timeout_ms = meta.timeout_ms
        self.timeout_s = timeout_ms / 1000 if timeout_ms is not None else spec.timeout_s
        self._call = FunctionCall(
            spec,
            codec=codec,
            wire_codec=meta.codec,
            channel=self.channel,
            cancel_event=self.cancel_event,
            deps=deps,
        )
        self._holds_slot = False
        self.stopped = asyncio.Event()
        self._deadline: asyncio.TimerHandle | None = None
        self._task = asyncio.get_running_loop().create_task(self._main(), name=meta.request_id)

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
        if self.is_finished:
            return False
        reason = "timeout" if timeout else "canceled"
        self.channel.event("request.canceled", {"function_name": self.spec.name, "reason": reason})
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
        self._task.cancel()
        self._call.stop_thread_later()
        return True

    # -- phases ---------------------------------------------------------------------------------

    async def _main(self) -> None:
        self.channel.event("request.received", {"function_name": self.spec.name})
        if self.timeout_s is not None:
            loop = asyncio.get_running_loop()
            self._deadline = loop.call_later(self.timeout_s, lambda: self.cancel(timeout=True))
        try:
            await self._phases()
        except asyncio.CancelledError:
            pass  # cancel() already reported the outcome
        except BaseException as exc:  # every failure must end as exactly one outcome
            self._fail(exc)
        finally:
            if self._deadline is not None:
                self._deadline.cancel()
            self._after()

    async def _phases(self) -> None:
        payload = self._decode()
        queued = time.monotonic()
        await self._deps.slots.acquire()
        self._holds_slot = True
        self._timing["queue_ms"] = (time.monotonic() - queued) * 1000
        self.channel.event("request.started", {"function_name": self.spec.name})
        self.channel.event("metrics.compute.started", {"at": _now_rfc3339()})
        await self._fetch_assets(payload)
        kwargs = await self._load_models(payload)
        ctx = self._context()
        output = await self._infer(ctx, payload, kwargs)
        self._succeed(await self._encode(output))

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
        await self._deps.assets.fetch_all(assets, self.request_id)
        self._metric("metrics.fetch", "fetch_ms", start)

    async def _load_models(self, payload: msgspec.Struct) -> dict[str, Any]:
        if not self.spec.injections:
            return {}
        models = self._deps.models
        if models is None:
            raise GenWorkerError(
                f"function '{self.spec.name}' needs models but none are configured"
            )
        settings = self._deps.settings
        with self._phase("model_resolve", settings.warn_model_resolve_s):
            ids = {
                i.param: await models.resolve(self.spec, i, payload) for i in self.spec.injections
            }
        self._cache_states = {m: _cache_state(models, m) for m in ids.values()}
        start = time.monotonic()
        with self._phase(
            "model_load", settings.warn_model_load_s, {"models": sorted(ids.values())}
        ):
            loaded = {
                i.param: await models.load(ids[i.param], i, self._deps.device)
                for i in self.spec.injections
            }
        self._metric("metrics.gpu_load", "model_load_ms", start)
        self._models = ids
        return loaded

    async def _infer(
        self, ctx: RequestContext, payload: msgspec.Struct, kwargs: dict[str, Any]
    ) -> Any:
        start = time.monotonic()
        with self._phase("inference", self._deps.settings.warn_inference_s):
            output = await self._call.run(ctx, payload, kwargs)
        self._metric("metrics.inference", "inference_ms", start)
        return output

    async def _encode(self, output: Any) -> bytes:
        if self.spec.is_streaming:
            return b""
        sink = self._sink() if self._codec.output_may_hold_assets else None
        if sink is not None and find_assets(output):
            await asyncio.to_thread(_persist_output_assets, output, sink)
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
    _sink_cache: OutputSink | None = None
    _fetched_inputs = False
    _models: dict[str, str] | None = None
    _cache_states: dict[str, str | None] | None = None

    def _sink(self) -> OutputSink | None:
        if self._sink_cache is None and self._deps.outputs is not None:
            self._sink_cache = self._deps.outputs(self.request_id)
        return self._sink_cache

    def _phase(self, name: str, warn_s: float, detail: dict[str, Any] | None = None) -> _Phase:
        return _Phase(self.channel, name, warn_s, detail or {})

    def _metric(self, event_type: str, timing_key: str, start: float) -> None:
        ms = (time.monotonic() - start) * 1000
        self._timing[timing_key] = ms
        self.channel.event(event_type, {"ms": round(ms, 3)})

    def _timing_ms(self) -> dict[str, float]:
        return {**self._timing, "total_ms": (time.monotonic() - self._received) * 1000}

    def _succeed(self, data: bytes) -> None:
        self._job_metrics()
        self.channel.event("metrics.compute.completed", {"at": _now_rfc3339()})
        self.channel.event("request.completed", {"function_name": self.spec.name})
        timing = self._timing_ms()
        self.channel.finish(lambda seq: Result(seq, data, timing))

    def _fail(self, exc: BaseException) -> None:
        if self.is_finished:
            return
        self.channel.event("request.failed", {"error_type": getattr(exc, "error_type", "internal")})
        timing = self._timing_ms()
        name = self.spec.name
        self.channel.finish(
            lambda seq: failure_from_exception(exc, seq=seq, function=name, timing_ms=timing)
        )

    def _job_metrics(self) -> None:
        payload: dict[str, Any] = {
            "schema_version": 1,
            "function_name": self.spec.name,
            "models": dict(self._models or {}),
            **{k: round(v, 3) for k, v in self._timing.items()},
        }
        if self.spec.is_streaming:
            payload["deltas"] = self.channel.delta_count
        states = [s for s in (self._cache_states or {}).values() if s is not None]
        if states:
            # The request was as cold as its coldest model.
            payload["cache_state"] = max(states, key=_CACHE_ORDER.index)
            payload["model_cache_states"] = dict(self._cache_states or {})
        self.channel.event("metrics.job", payload)

    def _after(self) -> None:
        """Release the slot once the function has really stopped, then mark the run stopped."""
        if self._fetched_inputs and self._deps.assets is not None:
            self._deps.assets.cleanup(self.request_id)

        def release() -> None:
            if self._holds_slot:
                self._holds_slot = False
                self._deps.slots.release()
            self.stopped.set()
            if self.stopped_callback is not None:
                self.stopped_callback()

        self._call.when_stopped(release)


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


class _Phase:
    """``request.<name>.started/completed/failed`` plus a one-shot ``stuck`` warning."""

    def __init__(
        self, channel: OutcomeChannel, name: str, warn_s: float, detail: dict[str, Any]
    ) -> None:
        self._channel = channel
        self._name = name
        self._warn_s = warn_s
        self._detail = detail
        self._start = 0.0
        self._timer: asyncio.TimerHandle | None = None

    def __enter__(self) -> None:
        self._start = time.monotonic()
        self._channel.event(f"request.{self._name}.started", self._detail)
        self._timer = asyncio.get_running_loop().call_later(self._warn_s, self._stuck)

    def _stuck(self) -> None:
        elapsed = time.monotonic() - self._start
        self._channel.event(f"request.{self._name}.stuck", {"elapsed_s": round(elapsed, 3)})

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: Any
    ) -> None:
        if self._timer is not None:
            self._timer.cancel()
        ms = round((time.monotonic() - self._start) * 1000, 3)
        if exc is None:
            self._channel.event(f"request.{self._name}.completed", {"ms": ms})
        elif not isinstance(exc, asyncio.CancelledError):
            self._channel.event(
                f"request.{self._name}.failed", {"ms": ms, "error": type(exc).__name__}
            )


_CACHE_ORDER = ["hot_vram", "warm_disk", "cold_remote"]


def _cache_state(models: ModelProvider, model_id: str) -> str | None:
    """Where the model was when asked for, if the provider knows (``hot_vram`` ...)."""
    probe = getattr(models, "cache_state", None)
    state = probe(model_id) if callable(probe) else None
    return state if state in _CACHE_ORDER else None


def _persist_output_assets(output: Any, sink: OutputSink) -> None:
    """Returned local files become outputs: an Asset with a local_path and no ref is saved."""
    for asset in find_assets(output):
        if asset.ref is None and asset.local_path is not None:
            path = Path(asset.local_path)
            saved = sink.save_file(path.name, path)
            for field in ("ref", "size_bytes", "sha256", "blake3", "mime_type", "local_path"):
                setattr(asset, field, getattr(saved, field))
