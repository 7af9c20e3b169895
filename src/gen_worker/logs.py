"""Logging helpers shared by every layer: secret redaction for log lines and error details.

Tokens, JWTs and presigned-URL signatures must never reach a log line or an error message;
:func:`redact` is applied to every operator-facing text the worker produces.
"""

from __future__ import annotations

import re

__all__ = ["REDACTED", "redact"]

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
