"""Who may do what on the hub: signed expiring URLs and bearer tokens.

Blob and upload-part URLs authorise themselves, the way presigned object-store URLs do: the
hub signs ``path`` and an expiry time with HMAC-SHA256 under a key of its own (random per
start unless one is given), so a URL handed to a worker works without a bearer token, only
for that path, and only until it expires. Everything else (resolve, the file API's JSON
routes and downloads) asks for ``Authorization: Bearer <token>`` when the hub was started with
tokens.

Neither a token nor a signature ever appears in an error message or a log line; the messages
say which part was wrong, not what it was.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from urllib.parse import quote

__all__ = [
    "DEFAULT_URL_TTL_S",
    "AccessDenied",
    "BearerAuth",
    "UrlSigner",
]

#: How long a signed URL stays valid unless the hub is told otherwise.
DEFAULT_URL_TTL_S = 3600.0
_KEY_BYTES = 32
_SIG_HEX_CHARS = 64


@dataclass(frozen=True, slots=True)
class AccessDenied(Exception):
    """A request may not proceed; ``status`` is 401 or 403, ``reason`` is safe to show."""

    status: int
    reason: str

    def __str__(self) -> str:
        return self.reason


class UrlSigner:
    """Signs paths into expiring URLs and checks the ``exp``/``sig`` a request came back with.

    ``clock`` returns Unix seconds; tests inject one to make URLs expire without waiting.
    """

    def __init__(
        self,
        key: bytes | None = None,
        *,
        ttl_s: float = DEFAULT_URL_TTL_S,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if ttl_s <= 0:
            raise ValueError(f"the URL lifetime must be a positive number of seconds, got {ttl_s}")
        if key is not None and len(key) < 16:
            raise ValueError(f"a signing key must be at least 16 bytes, got {len(key)}")
        self._key = key if key is not None else secrets.token_bytes(_KEY_BYTES)
        self.ttl_s = ttl_s
        self._clock = clock

    def now(self) -> float:
        return self._clock()

    def _mac(self, path: str, exp: str) -> str:
        message = f"{path}\n{exp}".encode()
        return hmac.new(self._key, message, hashlib.sha256).hexdigest()

    def sign(self, path: str) -> str:
        """``path`` (already URL-quoted, starting with ``/``) plus ``?exp=<unix>&sig=<hmac>``."""
        exp = str(int(self._clock() + self.ttl_s) + 1)
        return f"{path}?exp={exp}&sig={quote(self._mac(path, exp))}"

    def check(self, path: str, exp: str | None, sig: str | None) -> None:
        """Raise :class:`AccessDenied` (403) unless ``exp``/``sig`` sign ``path`` and are live.

        The signature is checked before the expiry, so an edited ``exp`` reads as a bad
        signature rather than as a fresh URL.
        """
        if not exp or not sig:
            missing = " and ".join(n for n, v in (("exp", exp), ("sig", sig)) if not v)
            raise AccessDenied(
                403,
                f"this URL must be signed: the {missing} query parameter is missing; "
                "ask the hub for a fresh URL (resolve, or start the upload again)",
            )
        if not exp.isdigit() or len(sig) != _SIG_HEX_CHARS:
            raise AccessDenied(403, "the URL's signature is malformed; ask the hub for a new URL")
        if not hmac.compare_digest(self._mac(path, exp), sig):
            raise AccessDenied(
                403,
                "the URL's signature does not match its path and expiry (edited, or signed "
                "by another hub start); ask the hub for a new URL",
            )
        if int(exp) < self._clock():
            raise AccessDenied(
                403, f"the URL expired at {int(exp)} (unix seconds); ask the hub for a new URL"
            )


class BearerAuth:
    """Checks ``Authorization: Bearer <token>`` against the hub's tokens; none means open."""

    def __init__(self, tokens: Sequence[str] = ()) -> None:
        for token in tokens:
            if not token or token != token.strip() or any(c.isspace() for c in token):
                raise ValueError("a hub token must be non-empty and contain no whitespace")
        self._tokens = tuple(t.encode() for t in tokens)

    @property
    def required(self) -> bool:
        return bool(self._tokens)

    def check(self, authorization: str | None) -> None:
        """Raise :class:`AccessDenied`: 401 when no bearer token came, 403 when it is wrong."""
        if not self._tokens:
            return
        scheme, _, token = (authorization or "").strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise AccessDenied(
                401,
                "this hub requires a bearer token: send 'Authorization: Bearer <token>' "
                "with one of the tokens the hub was started with (--token)",
            )
        given = token.strip().encode()
        # Compare against every token so the time taken does not say which one was close.
        matched = False
        for known in self._tokens:
            matched |= hmac.compare_digest(known, given)
        if not matched:
            raise AccessDenied(403, "the bearer token is not one this hub accepts")
