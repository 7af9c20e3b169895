"""Shapes of the dev runner's answers: the JSON body, HTTP status per error, SSE items."""

from __future__ import annotations

from typing import Any

import msgspec

from gen_worker.engine import Delta, Event, Failure, Log, Outcome, Progress, Result

__all__ = [
    "InvokeResponse",
    "error_body",
    "event_item",
    "invoke_response",
    "sse",
    "status_for",
]

_STATUS = {
    "validation": 400,
    "auth": 403,
    "timeout": 504,
    "canceled": 409,
    "output_too_large": 413,
    "busy": 429,
    "retryable": 503,
    "resource": 503,
}
_REASON_STATUS = {"input_too_large": 413}
#: Failures whose detail stays in the operator's logs: the caller gets the safe message only.
_INTERNAL = ("internal", "fatal", "definition")


class EventItem(msgspec.Struct, omit_defaults=True):
    seq: int
    type: str
    payload: dict[str, Any] = {}


class InvokeResponse(msgspec.Struct):
    request_id: str
    success: bool
    output: msgspec.Raw | None = None
    error_type: str | None = None
    safe_message: str | None = None
    error_message: str | None = None
    #: An engine Event encodes exactly as an EventItem (see gen_worker.engine.outcomes).
    events: list[EventItem | Event] = []
    timing_ms: dict[str, float] = {}


def status_for(failure: Failure) -> int:
    if failure.reason in _REASON_STATUS:
        return _REASON_STATUS[failure.reason]
    return _STATUS.get(failure.error_type, 500)


def event_item(outcome: Progress | Log | Event) -> EventItem:
    if isinstance(outcome, Progress):
        payload: dict[str, Any] = {"progress": outcome.progress, **outcome.detail}
        if outcome.stage is not None:
            payload["stage"] = outcome.stage
        return EventItem(outcome.seq, "request.progress", payload)
    if isinstance(outcome, Log):
        return EventItem(
            outcome.seq, "request.log", {"message": outcome.message, "level": outcome.level}
        )
    return EventItem(outcome.seq, outcome.event_type, outcome.payload)


def invoke_response(
    request_id: str,
    terminal: Result | Failure,
    events: list[EventItem | Event],
    *,
    streaming: bool,
) -> tuple[int, InvokeResponse]:
    """The status and body for a finished request."""
    if isinstance(terminal, Result):
        output = None if streaming else msgspec.Raw(terminal.output)
        return 200, InvokeResponse(
            request_id, True, output, events=events, timing_ms=terminal.timing_ms
        )
    detail = None if terminal.error_type in _INTERNAL else terminal.error_message
    body = InvokeResponse(
        request_id,
        False,
        None,
        terminal.error_type,
        terminal.safe_message,
        detail,
        events,
        terminal.timing_ms,
    )
    return status_for(terminal), body


def error_body(error_type: str, message: str, **extra: Any) -> dict[str, Any]:
    """A failure that never reached the engine (unknown function, bad envelope)."""
    return {"success": False, "error_type": error_type, "safe_message": message, **extra}


_encoder = msgspec.json.Encoder()


def sse(kind: str, data: Any, seq: int | None = None) -> bytes:
    """One server-sent event; ``data`` is encoded as one line of JSON."""
    head = f"id: {seq}\n" if seq is not None else ""
    return f"{head}event: {kind}\ndata: ".encode() + _encoder.encode(data) + b"\n\n"


def sse_for(outcome: Outcome) -> bytes:
    """The SSE item of a non-terminal outcome."""
    if isinstance(outcome, Delta):
        return sse("delta", {"seq": outcome.seq, "delta": msgspec.Raw(outcome.data)}, outcome.seq)
    if isinstance(outcome, Progress):
        item = event_item(outcome)
        return sse("progress", {"seq": item.seq, **item.payload}, outcome.seq)
    assert isinstance(outcome, Log | Event)
    return sse("event", event_item(outcome), outcome.seq)
