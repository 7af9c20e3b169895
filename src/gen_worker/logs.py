"""Logging shared by every layer: structured log lines and secret redaction.

Tokens, JWTs and presigned-URL signatures must never reach a log line or an error message;
:func:`redact` is applied to every operator-facing text the worker produces.
"""

from __future__ import annotations

import os
import re
import sys
import time
from typing import Any

import msgspec

__all__ = ["REDACTED", "log", "redact"]

REDACTED = "[REDACTED]"

_PATTERNS = [
    # JWTs: three base64url segments, the first starting with a JSON object header.
    re.compile(r"eyJ[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*"),
    # Bearer / Basic credentials in headers or messages.
    re.compile(r"(?i)(\b(?:bearer|basic)\s+)[A-Za-z0-9._~+/=-]{8,}"),
    # key=value, key: value and "key": "value" secrets: query strings, headers, JSON.
    re.compile(
        r"(?i)(\b(?:x-amz-signature|x-amz-credential|x-amz-security-token|signature|sig|token|"
        r"access_token|refresh_token|api_key|apikey|password|secret|authorization)"
        r"[\"']?\s*[=:]\s*[\"']?)(?!\[REDACTED\]|bearer\b|basic\b)[^&\s\"',}]+"
    ),
]


def redact(text: str) -> str:
    """``text`` with credentials replaced by ``[REDACTED]``."""
    for pattern in _PATTERNS:
        text = pattern.sub(lambda m: (m.group(1) if m.groups() else "") + REDACTED, text)
    return text


_LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40}


def _threshold() -> int:
    # Read once per process; the logs module is a leaf, so it reads its one variable itself.
    level = os.environ.get("GEN_WORKER_LOG_LEVEL", "info").strip().lower()
    return _LEVELS.get(level, 20)


_MIN_LEVEL = _threshold()


def log(level: str, message: str, **fields: Any) -> None:
    """One structured log line on stderr: JSON when not on a terminal; secrets redacted."""
    if _LEVELS.get(level, 20) < _MIN_LEVEL:
        return
    record = {"ts": round(time.time(), 3), "level": level, "msg": message, **fields}
    if sys.stderr.isatty():
        extra = " ".join(f"{k}={v}" for k, v in fields.items())
        line = f"{level.upper():7} {message} {extra}".rstrip()
    else:
        line = msgspec.json.encode(record, enc_hook=str).decode()
    try:
        sys.stderr.write(redact(line) + "\n")
        sys.stderr.flush()
    except (OSError, ValueError):  # stderr closed: logging must never fail the worker
        return
