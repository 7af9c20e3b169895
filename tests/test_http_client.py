"""gen_worker.http_client: the lazily made httpx client and the retry back-off."""

from __future__ import annotations

import asyncio

import httpx

from gen_worker.http_client import LazyHttpClient, retry_delay_s


def test_a_client_is_made_on_first_use_and_closed_only_if_made_here() -> None:
    async def go() -> None:
        lazy = LazyHttpClient(timeout_s=7.0)
        made = lazy.client
        assert lazy.client is made  # one client, reused
        assert made.timeout == httpx.Timeout(7.0)
        await lazy.aclose()
        assert made.is_closed
        fresh = lazy.client  # used again after closing: a new one, not the closed one
        assert fresh is not made and not fresh.is_closed
        await lazy.aclose()
        await lazy.aclose()  # closing twice is harmless

        given = httpx.AsyncClient()
        borrowed = LazyHttpClient(given, timeout_s=1.0)
        assert borrowed.client is given
        await borrowed.aclose()
        assert not given.is_closed  # the caller's client is the caller's to close
        await given.aclose()

    asyncio.run(go())


def test_the_retry_delay_doubles_with_full_jitter_on_top() -> None:
    for attempt, base in ((0, 0.2), (1, 0.4), (3, 1.6)):
        delays = [retry_delay_s(0.2, attempt) for _ in range(200)]
        assert all(base <= d <= 2 * base for d in delays), (attempt, min(delays), max(delays))
        assert max(delays) - min(delays) > base / 4  # jittered, not constant
    assert retry_delay_s(0.0, 5) == 0.0
