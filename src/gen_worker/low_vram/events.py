"""Where the ladder's events go: an explicit callback, the request's sink, or the log.

The engine sets :data:`event_sink` for the duration of a request (:func:`use_event_sink`), so
an endpoint's own ``apply_low_vram_config`` call reaches that request's events without the
endpoint passing anything. Emitting is best-effort and never raises into the caller.
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from gen_worker.logs import log

__all__ = ["EmitFn", "emit_event", "event_sink", "use_event_sink"]

#: ``emit(event_type, payload)``; the payload is a JSON-ready dict.
EmitFn = Callable[[str, dict[str, Any]], None]

event_sink: contextvars.ContextVar[EmitFn | None] = contextvars.ContextVar(
    "gen_worker_low_vram_event_sink", default=None
)


@contextmanager
def use_event_sink(emit: EmitFn | None) -> Iterator[None]:
    """Route the ladder's events in this context (and tasks copied from it) to ``emit``."""
    token = event_sink.set(emit)
    try:
        yield
    finally:
        event_sink.reset(token)


def emit_event(event_type: str, payload: dict[str, Any], emit: EmitFn | None = None) -> None:
    """Send one event to ``emit``, else to the context's sink, else to a structured log line."""
    target = emit if emit is not None else event_sink.get()
    if target is None:
        log("info", event_type, **payload)
        return
    try:
        target(event_type, dict(payload))
    except Exception as exc:  # a broken sink must not turn a working inference into a failure
        log(
            "warning",
            "event sink failed",
            event_type=event_type,
            error=f"{type(exc).__name__}: {exc}",
        )
