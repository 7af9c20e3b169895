"""``RequestContext``: what a worker function receives as its first argument.

It is built from narrow callables (:class:`ContextHooks`) so that this layer never imports the
engine or a transport: the engine passes hooks that stream events and persist outputs, a test
can pass lambdas.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from gen_worker.authoring.types import Asset, Tensors
from gen_worker.errors import CanceledError, FatalError

__all__ = ["CheckpointStream", "ContextHooks", "OutputSink", "OutputStream", "RequestContext"]


class OutputStream(Protocol):
    """An incremental output writer; ``finalize()`` makes the output visible and describes it."""

    def write(self, data: bytes) -> int: ...
    def finalize(self) -> Asset: ...
    def abort(self) -> None: ...


class OutputSink(Protocol):
    """Persists outputs: under a local directory in the dev runner, through the hub in a worker."""

    def save_bytes(self, ref: str, data: bytes) -> Asset: ...
    def save_file(self, ref: str, local_path: Path) -> Asset: ...
    def open_stream(self, ref: str) -> OutputStream: ...
    def save_checkpoint(self, ref: str, local_path: Path, format: str) -> Tensors: ...
    def save_checkpoint_bytes(self, ref: str, data: bytes, format: str) -> Tensors: ...


class CheckpointStream:
    """An output stream whose ``finalize()`` describes a weight artifact (:class:`Tensors`)."""

    def __init__(self, stream: OutputStream, format: str) -> None:
        self._stream = stream
        self._format = format

    def write(self, data: bytes) -> int:
        return self._stream.write(data)

    def finalize(self) -> Tensors:
        asset = self._stream.finalize()
        return Tensors(
            ref=asset.ref or "",
            format=self._format,
            size_bytes=asset.size_bytes,
            sha256=asset.sha256,
            blake3=asset.blake3,
        )

    def abort(self) -> None:
        self._stream.abort()

    def __enter__(self) -> CheckpointStream:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *rest: object) -> None:
        if exc_type is None:
            self.finalize()
        else:
            self.abort()


def _drop_event(event_type: str, payload: dict[str, Any]) -> None:
    del event_type, payload  # a context built without hooks has nowhere to send events


@dataclass(frozen=True, slots=True)
class ContextHooks:
    """The callables a context delegates to; each default is a safe do-nothing or a clear error."""

    emit: Callable[[str, dict[str, Any]], None] = _drop_event
    outputs: OutputSink | None = None
    preferred_batch_size: Callable[[], int] = lambda: 1
    prefetch_depth: Callable[[], int] = lambda: 0


@dataclass(slots=True)
class _Progress:
    last: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock)


class RequestContext:
    """Identity, deadline, cancellation, progress, events and outputs of one request."""

    def __init__(
        self,
        *,
        request_id: str,
        function_name: str,
        job_id: str | None = None,
        owner: str | None = None,
        invoker_id: str | None = None,
        release_id: str | None = None,
        parent_request_id: str | None = None,
        child_request_id: str | None = None,
        item_id: str | None = None,
        item_index: int | None = None,
        device: str = "cpu",
        timeout_ms: int | None = None,
        deadline: float | None = None,
        cancel_event: threading.Event | None = None,
        resolved_models: Mapping[str, Any] | None = None,
        required_models: Sequence[str] = (),
        hooks: ContextHooks | None = None,
    ) -> None:
        self.request_id = request_id
        self.function_name = function_name
        self.job_id = job_id
        self.owner = owner
        self.invoker_id = invoker_id
        self.release_id = release_id
        self.parent_request_id = parent_request_id
        self.child_request_id = child_request_id
        self.item_id = item_id
        self.item_index = item_index
        self.device = device
        self.timeout_ms = timeout_ms
        if deadline is None and timeout_ms is not None:
            deadline = time.monotonic() + timeout_ms / 1000.0
        #: ``time.monotonic()`` seconds at which the request times out, or None.
        self.deadline = deadline
        self.cancel_event = cancel_event if cancel_event is not None else threading.Event()
        self.resolved_models: Mapping[str, Any] = dict(resolved_models or {})
        self.required_models: tuple[str, ...] = tuple(required_models)
        self._hooks = hooks if hooks is not None else ContextHooks()
        self._progress = _Progress()

    def __repr__(self) -> str:
        return f"RequestContext(request_id={self.request_id!r}, function={self.function_name!r})"

    # -- deadline and cancellation ------------------------------------------------------

    def time_remaining_s(self) -> float | None:
        """Seconds until the deadline (never negative), or None when there is no deadline."""
        if self.deadline is None:
            return None
        return max(0.0, self.deadline - time.monotonic())

    def is_canceled(self) -> bool:
        """True once the request was interrupted, canceled or ran past its deadline."""
        return self.cancel_event.is_set()

    def raise_if_canceled(self) -> None:
        """Raise :class:`CanceledError` if the request was canceled; call it between steps."""
        if self.cancel_event.is_set():
            raise CanceledError(f"request {self.request_id} was canceled")

    # -- progress, logs, events ---------------------------------------------------------

    def progress(self, fraction: float, stage: str | None = None, **detail: Any) -> None:
        """Report progress in [0, 1]; values are clamped and never go backwards."""
        value = min(1.0, max(0.0, float(fraction)))
        with self._progress.lock:
            value = max(value, self._progress.last)
            self._progress.last = value
        payload: dict[str, Any] = {"progress": value, **detail}
        if stage is not None:
            payload["stage"] = stage
        self._hooks.emit("request.progress", payload)

    def log(self, message: str, level: str = "info") -> None:
        """Attach a log line to this request (shown with its events)."""
        self._hooks.emit("request.log", {"message": str(message), "level": level})

    def emit(self, event_type: str, payload: dict[str, Any] | None = None) -> None:
        """Send a custom event; ``payload`` must be JSON-encodable."""
        if not isinstance(event_type, str) or not event_type:
            raise ValueError(f"event_type must be a non-empty string, got {event_type!r}")
        self._hooks.emit(event_type, dict(payload or {}))

    # -- outputs ------------------------------------------------------------------------

    def _sink(self) -> OutputSink:
        if self._hooks.outputs is None:
            raise FatalError(
                "this RequestContext has no output sink, so outputs cannot be saved; "
                "run the function through the worker or the dev runner, or build the context "
                "with ContextHooks(outputs=...)"
            )
        return self._hooks.outputs

    def save_bytes(self, ref: str, data: bytes) -> Asset:
        """Persist ``data`` as the output ``ref`` (``jobs/<request_id>/outputs/<name>``)."""
        return self._sink().save_bytes(ref, data)

    def save_file(self, ref: str, local_path: str | Path) -> Asset:
        """Persist the file at ``local_path`` as the output ``ref``."""
        return self._sink().save_file(ref, Path(local_path))

    def open_output_stream(self, ref: str) -> OutputStream:
        """Open an incremental writer for the output ``ref``."""
        return self._sink().open_stream(ref)

    def save_checkpoint(
        self, ref: str, local_path: str | Path, format: str = "safetensors"
    ) -> Tensors:
        """Persist a weight artifact (conversion and training functions)."""
        return self._sink().save_checkpoint(ref, Path(local_path), format)

    def save_checkpoint_bytes(self, ref: str, data: bytes, format: str = "safetensors") -> Tensors:
        """Persist in-memory weight bytes as an artifact."""
        return self._sink().save_checkpoint_bytes(ref, data, format)

    def open_checkpoint_stream(self, ref: str, format: str = "safetensors") -> CheckpointStream:
        """Open an incremental writer for a weight artifact."""
        return CheckpointStream(self._sink().open_stream(ref), format)

    # -- batching hints -----------------------------------------------------------------

    def preferred_batch_size(self) -> int:
        """The batch size the scheduler currently prefers for this function."""
        return self._hooks.preferred_batch_size()

    def prefetch_depth(self) -> int:
        """How many batches ahead the function may prefetch."""
        return self._hooks.prefetch_depth()
