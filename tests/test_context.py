"""RequestContext behaviour that needs no engine: identity, deadline, cancellation, events."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest

from gen_worker import Asset, RequestContext, Tensors
from gen_worker.authoring import ContextHooks, OutputStream
from gen_worker.errors import CanceledError, FatalError


def recording_context(**kwargs: Any) -> tuple[RequestContext, list[tuple[str, dict[str, Any]]]]:
    events: list[tuple[str, dict[str, Any]]] = []
    hooks = ContextHooks(emit=lambda t, p: events.append((t, p)))
    return RequestContext(request_id="req-1", function_name="f", hooks=hooks, **kwargs), events


def test_progress_is_clamped_and_monotonic() -> None:
    ctx, events = recording_context()
    ctx.progress(0.5, stage="denoise", step=10)
    ctx.progress(0.2)
    ctx.progress(7)
    ctx.progress(-1)
    assert events == [
        ("request.progress", {"progress": 0.5, "stage": "denoise", "step": 10}),
        ("request.progress", {"progress": 0.5}),
        ("request.progress", {"progress": 1.0}),
        ("request.progress", {"progress": 1.0}),
    ]


def test_log_and_emit() -> None:
    ctx, events = recording_context()
    ctx.log("loaded", level="debug")
    ctx.emit("custom.thing", {"n": 1})
    assert events == [
        ("request.log", {"message": "loaded", "level": "debug"}),
        ("custom.thing", {"n": 1}),
    ]
    with pytest.raises(ValueError, match="event_type must be a non-empty string"):
        ctx.emit("", {})


def test_cancellation() -> None:
    event = threading.Event()
    ctx, _ = recording_context(cancel_event=event)
    assert not ctx.is_canceled()
    ctx.raise_if_canceled()
    event.set()
    assert ctx.is_canceled()
    with pytest.raises(CanceledError, match="request req-1 was canceled"):
        ctx.raise_if_canceled()


def test_deadline_from_timeout() -> None:
    ctx, _ = recording_context(timeout_ms=10_000)
    remaining = ctx.time_remaining_s()
    assert remaining is not None and 9.0 < remaining <= 10.0
    assert ctx.deadline is not None and ctx.deadline > time.monotonic()
    no_deadline, _ = recording_context()
    assert no_deadline.time_remaining_s() is None
    past, _ = recording_context(deadline=time.monotonic() - 5)
    assert past.time_remaining_s() == 0.0


def test_outputs_without_a_sink_are_a_clear_error() -> None:
    ctx = RequestContext(request_id="r", function_name="f")
    with pytest.raises(FatalError, match="has no output sink"):
        ctx.save_bytes("jobs/r/outputs/a.bin", b"x")
    ctx.progress(0.5)  # no hooks: events are dropped, never an error


class MemorySink:
    def __init__(self) -> None:
        self.saved: dict[str, bytes] = {}

    def save_bytes(self, ref: str, data: bytes) -> Asset:
        self.saved[ref] = data
        return Asset(ref=ref, size_bytes=len(data))

    def save_file(self, ref: str, local_path: Path) -> Asset:
        return self.save_bytes(ref, local_path.read_bytes())

    def open_stream(self, ref: str) -> OutputStream:
        raise AssertionError("not used")

    def save_checkpoint(self, ref: str, local_path: Path, format: str) -> Tensors:
        self.saved[ref] = local_path.read_bytes()
        return Tensors(ref=ref, format=format)


def test_outputs_go_to_the_sink(tmp_path: Path) -> None:
    sink = MemorySink()
    ctx = RequestContext(request_id="r", function_name="f", hooks=ContextHooks(outputs=sink))
    assert ctx.save_bytes("jobs/r/outputs/a", b"abc") == Asset(ref="jobs/r/outputs/a", size_bytes=3)
    file = tmp_path / "w.safetensors"
    file.write_bytes(b"weights")
    assert ctx.save_file("jobs/r/outputs/b", str(file)).size_bytes == 7
    assert ctx.save_checkpoint("jobs/r/outputs/w", file) == Tensors(ref="jobs/r/outputs/w")
    assert sink.saved == {
        "jobs/r/outputs/a": b"abc",
        "jobs/r/outputs/b": b"weights",
        "jobs/r/outputs/w": b"weights",
    }


def test_batching_hints_come_from_hooks() -> None:
    ctx = RequestContext(
        request_id="r",
        function_name="f",
        hooks=ContextHooks(preferred_batch_size=lambda: 8, prefetch_depth=lambda: 2),
    )
    assert (ctx.preferred_batch_size(), ctx.prefetch_depth()) == (8, 2)
    assert RequestContext(request_id="r", function_name="f").preferred_batch_size() == 1
