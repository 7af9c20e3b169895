"""What the package's small HTTP API clients share: an httpx client made on first use, and the
back-off between retries.

The file API client, the hub's resolve client and the input-asset fetcher each talk to one
service with httpx (docs/architecture.md says why httpx). Importing httpx costs startup time
that most workers never need to spend, so the client is made on first use, unless the caller
hands one in; then it is the caller's to close.
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import httpx

__all__ = ["LazyHttpClient", "retry_delay_s"]


class LazyHttpClient:
    """``client`` (the caller's, never closed here), or an ``httpx.AsyncClient`` made on first
    use with ``timeout_s`` and closed by :meth:`aclose`."""

    def __init__(self, client: httpx.AsyncClient | None = None, *, timeout_s: float) -> None:
        self._client = client
        self._owned = client is None
        self._timeout_s = timeout_s

    @property
    def client(self) -> httpx.AsyncClient:
        if self._client is None:
            import httpx  # noqa: PLC0415  # deferred: see the module docstring

            self._client = httpx.AsyncClient(timeout=self._timeout_s)
        return self._client

    async def aclose(self) -> None:
        """Close the client if it was made here (a later use makes a new one)."""
        if self._owned and self._client is not None:
            client, self._client = self._client, None
            await client.aclose()


def retry_delay_s(backoff_s: float, attempt: int) -> float:
    """Seconds to wait before retry number ``attempt + 1``: exponential, with full jitter on
    top so that clients that failed together do not retry together."""
    delay = backoff_s * float(2**attempt)
    return delay + random.uniform(0, delay)
