"""What running one request produces, in order: a union of typed outcomes.

Every outcome carries the request's sequence number ``seq`` (0, 1, 2 ... per request) so a
transport can deliver them in order and a scheduler can drop duplicates after a resume. A run
yields any number of :class:`Progress`, :class:`Log`, :class:`Event` and :class:`Delta`, then
exactly one terminal outcome, :class:`Result` or :class:`Failure`.

Outcomes are plain data that never refer back to themselves: ``gc=False`` keeps the cycle
collector from tracking the ten or so a request produces. Transports tell them apart by type
(nothing decodes them), so the union needs no tags; :class:`Event` has none, so that it encodes
as the dev runner's event item.
"""

from __future__ import annotations

from typing import Any, TypeAlias

import msgspec

__all__ = [
    "TERMINAL",
    "Delta",
    "Event",
    "Failure",
    "Log",
    "Outcome",
    "Progress",
    "Result",
]


class Progress(msgspec.Struct, frozen=True, gc=False, tag="progress"):
    seq: int
    progress: float
    stage: str | None = None
    detail: dict[str, Any] = {}


class Log(msgspec.Struct, frozen=True, gc=False, tag="log"):
    seq: int
    message: str
    level: str = "info"


class Event(
    msgspec.Struct, frozen=True, gc=False, omit_defaults=True, rename={"event_type": "type"}
):
    """A lifecycle, metrics or custom event (``event_type`` as in the observability spec).

    Untagged, and encoded as ``{"seq", "type", "payload"?}``: exactly an item of the dev
    runner's ``events`` list, which takes events as they are instead of converting each one
    (nine per request).
    """

    seq: int
    event_type: str
    payload: dict[str, Any] = {}


class Delta(msgspec.Struct, frozen=True, gc=False, tag="delta"):
    """One streamed item, already encoded with the request's codec."""

    seq: int
    data: bytes


class Result(msgspec.Struct, frozen=True, gc=False, tag="result"):
    """Success: the encoded output (for a streaming function, an empty body)."""

    seq: int
    output: bytes
    timing_ms: dict[str, float] = {}


class Failure(msgspec.Struct, frozen=True, gc=False, tag="failure"):
    """The run failed; see the error table of the spec for ``error_type`` and ``retryable``."""

    seq: int
    error_type: str
    retryable: bool
    #: What the end caller may see.
    safe_message: str
    #: Full detail for operators (secrets redacted).
    error_message: str
    #: A finer reason a transport may map to its own status (``input_too_large``,
    #: ``unknown_function``); None when ``error_type`` says it all.
    reason: str | None = None
    timing_ms: dict[str, float] = {}


Outcome: TypeAlias = Progress | Log | Event | Delta | Result | Failure
TERMINAL = (Result, Failure)
