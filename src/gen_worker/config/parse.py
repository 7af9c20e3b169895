"""Typed readers of environment values, shared by every settings module.

Each parser takes ``(variable, text)`` and returns the typed value, or raises
:class:`~gen_worker.errors.ConfigError` naming the variable and the valid spellings. Parsers
are never handed a blank value: :func:`read` treats empty or whitespace-only as unset, because
an orchestrator that templates ``FOO=`` means "no value", not "the empty string".
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TypeVar

from gen_worker.errors import ConfigError

__all__ = [
    "address",
    "addresses",
    "boolean",
    "directory",
    "gigabytes",
    "non_negative_float",
    "non_negative_int",
    "positive_float",
    "positive_gigabytes",
    "positive_int",
    "read",
    "string",
]

T = TypeVar("T")

GRPC_PREFIXES = ("grpcs://", "grpc://")

_TRUE = frozenset({"true", "1", "yes", "on"})
_FALSE = frozenset({"false", "0", "no", "off"})
_BOOLEAN_SPELLINGS = "true/false, 1/0, yes/no or on/off"
_MAX_PORT = 65535


def read(env: Mapping[str, str], variable: str, parse: Callable[[str, str], T]) -> T | None:
    """``parse(variable, value)`` of ``env[variable]``, or None when it is unset or blank."""
    text = env.get(variable)
    if text is None or not text.strip():
        return None
    return parse(variable, text)


def string(variable: str, text: str) -> str:
    """The value without surrounding whitespace (secrets mounted from files end in a newline)."""
    del variable  # every parser takes the variable; a string has no malformed spelling
    return text.strip()


def directory(variable: str, text: str) -> str:
    """A directory path, ``~`` expanded (it need not exist yet: its user creates it)."""
    return str(Path(string(variable, text)).expanduser())


def _integer(variable: str, text: str, minimum: int) -> int:
    try:
        value = int(text.strip())
    except ValueError:
        problem = f"{text!r} is not an integer; use a whole number >= {minimum}"
        raise ConfigError(variable, problem) from None
    if value < minimum:
        raise ConfigError(variable, f"{value} is not valid; use a whole number >= {minimum}")
    return value


def positive_int(variable: str, text: str) -> int:
    """A whole number >= 1."""
    return _integer(variable, text, 1)


def non_negative_int(variable: str, text: str) -> int:
    """A whole number >= 0."""
    return _integer(variable, text, 0)


def _number(variable: str, text: str, hint: str) -> float:
    try:
        return float(text.strip())
    except ValueError:
        raise ConfigError(variable, f"{text!r} is not a number; use {hint}") from None


def positive_float(variable: str, text: str) -> float:
    """A finite number > 0 (seconds, gigabytes)."""
    value = _number(variable, text, "seconds > 0, e.g. 30")
    # ``not value > 0`` also refuses NaN, which compares false with everything.
    if not value > 0 or math.isinf(value):
        raise ConfigError(variable, f"{text!r} is not valid; use a finite number > 0")
    return value


def non_negative_float(variable: str, text: str) -> float:
    """A finite number >= 0."""
    value = _number(variable, text, "seconds >= 0, e.g. 0.1")
    if not value >= 0 or math.isinf(value):
        raise ConfigError(variable, f"{text!r} is not valid; use a finite number >= 0")
    return value


def _gigabytes(variable: str, text: str, *, positive: bool) -> float:
    bound = "> 0" if positive else ">= 0"
    try:
        value = float(text.strip())
    except ValueError:
        raise ConfigError(
            variable, f"{text!r} is not a number; use a number of GB {bound}, e.g. 20 or 3.5"
        ) from None
    too_small = value <= 0 if positive else value < 0
    if not math.isfinite(value) or too_small:
        raise ConfigError(variable, f"{text!r} is not valid; use a finite number of GB {bound}")
    return value


def gigabytes(variable: str, text: str) -> float:
    """A size in GB >= 0 (a margin, a threshold)."""
    return _gigabytes(variable, text, positive=False)


def positive_gigabytes(variable: str, text: str) -> float:
    """A size in GB > 0 (a budget)."""
    return _gigabytes(variable, text, positive=True)


def boolean(variable: str, text: str) -> bool:
    """true/false, 1/0, yes/no, on/off in any letter case."""
    word = text.strip().lower()
    if word in _TRUE:
        return True
    if word in _FALSE:
        return False
    raise ConfigError(variable, f"{text!r} is not a boolean; use {_BOOLEAN_SPELLINGS}")


def _port_of(hostport: str) -> tuple[str, str]:
    """Split ``host:port``; an IPv6 host keeps its brackets (``[::1]:50051``)."""
    host, sep, port = hostport.rpartition(":")
    if not sep:
        return hostport, ""
    return host, port


def _valid_host(host: str) -> bool:
    if host.startswith("["):
        # A bracketed IPv6 literal: whatever is inside must not smuggle in another bracket.
        inner = host[1:-1]
        return host.endswith("]") and bool(inner) and "[" not in inner and "]" not in inner
    return (
        bool(host) and not any(c in host for c in "/[]:@?#") and not any(c.isspace() for c in host)
    )


def address(variable: str, text: str) -> str:
    """One ``host:port`` (port 1-65535), optionally prefixed ``grpc://`` or ``grpcs://``.

    The prefix is kept: it decides plaintext or TLS later (:func:`gen_worker.config.tls_for`).
    """
    value = text.strip()
    hostport = value
    for prefix in GRPC_PREFIXES:
        if value.lower().startswith(prefix):
            hostport = value[len(prefix) :]
            break
    host, port = _port_of(hostport)
    usage = "use host:port with a port from 1 to 65535, e.g. scheduler.internal:8443"
    valid_port = port.isascii() and port.isdecimal() and 1 <= int(port) <= _MAX_PORT
    if not (_valid_host(host) and valid_port):
        raise ConfigError(variable, f"{value!r} is not a valid address; {usage}")
    return value


def addresses(variable: str, text: str) -> tuple[str, ...]:
    """A comma-separated list of :func:`address` values; blank entries are dropped."""
    items = [item.strip() for item in text.split(",")]
    return tuple(address(variable, item) for item in items if item)
