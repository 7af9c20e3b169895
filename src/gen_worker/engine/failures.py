"""Exceptions to wire failures (the error table of the spec), with secrets redacted."""

from __future__ import annotations

import traceback

from gen_worker.engine.outcomes import Failure
from gen_worker.errors import GenWorkerError
from gen_worker.logs import redact
from gen_worker.low_vram.probes import is_oom_error

__all__ = ["canceled_failure", "failure_from_exception", "timeout_failure"]


#: The caller's own mistakes: the message says everything, a traceback would be noise.
_NO_TRACEBACK = ("validation", "busy", "canceled", "timeout")


def _detail(exc: BaseException) -> str:
    if isinstance(exc, GenWorkerError) and exc.error_type in _NO_TRACEBACK:
        return redact(f"{type(exc).__name__}: {exc}")
    text = "".join(traceback.format_exception(exc)).strip()
    return redact(text)


def failure_from_exception(
    exc: BaseException, *, seq: int, function: str, timing_ms: dict[str, float]
) -> Failure:
    """Our errors keep their type and message; anything else is ``internal`` with a generic text."""
    if isinstance(exc, GenWorkerError):
        return Failure(
            seq=seq,
            error_type=exc.error_type,
            retryable=exc.retryable,
            safe_message=redact(exc.safe_message),
            error_message=_detail(exc),
            reason=getattr(exc, "reason", None),
            timing_ms=timing_ms,
        )
    if is_oom_error(exc):
        # Out of GPU memory after whatever the low-VRAM ladder could do: another worker (a
        # bigger GPU, or one with less loaded) may well succeed.
        return Failure(
            seq=seq,
            error_type="resource",
            retryable=True,
            safe_message=f"function '{function}' ran out of GPU memory",
            error_message=_detail(exc),
            timing_ms=timing_ms,
        )
    return Failure(
        seq=seq,
        error_type="internal",
        retryable=False,
        safe_message=f"internal error in function '{function}'",
        error_message=_detail(exc),
        timing_ms=timing_ms,
    )


def canceled_failure(*, seq: int, request_id: str, timing_ms: dict[str, float]) -> Failure:
    message = f"request {request_id} was canceled"
    return Failure(seq, "canceled", False, message, message, timing_ms=timing_ms)


def timeout_failure(
    *, seq: int, request_id: str, timeout_s: float, timing_ms: dict[str, float]
) -> Failure:
    message = f"request {request_id} did not finish within its deadline of {timeout_s:g} s"
    return Failure(seq, "timeout", False, message, message, timing_ms=timing_ms)
