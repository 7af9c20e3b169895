"""A small HTTP/1.1 keep-alive load generator over raw asyncio sockets (loopback only).

N connections each send the same POST back to back (``Content-Length`` body) and read the
status line, the headers and the ``Content-Length`` body of each answer. After a warm-up,
requests that start inside the measuring window are counted, with their latency from
``time.perf_counter()``. httpx costs too much CPU per request to be the client here.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

__all__ = ["LoadResult", "percentile", "run_load"]

#: How long past the measuring window a stalled server is waited for.
_STALL_S = 10.0


@dataclass(frozen=True, slots=True)
class LoadResult:
    requests: int
    errors: int
    seconds: float
    latencies: list[float]  # seconds, sorted
    #: Every answer read, warm-up included (what the server's CPU time was spent on).
    answered: int = 0

    @property
    def rps(self) -> float:
        return self.requests / self.seconds

    def ms(self, q: float) -> float:
        return percentile(self.latencies, q) * 1000


def percentile(ordered: list[float], q: float) -> float:
    """The ``q`` quantile (0..1) of a sorted list, nearest rank; NaN when empty."""
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _request_bytes(host: str, port: int, path: str, body: bytes) -> bytes:
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


async def _read_response(reader: asyncio.StreamReader) -> int:
    """Read one response; its status code."""
    head = await reader.readuntil(b"\r\n\r\n")
    at = head.lower().find(b"\r\ncontent-length:")
    if at < 0:
        raise RuntimeError(f"response without Content-Length: {head[:200]!r}")
    end = head.index(b"\r\n", at + 2)
    await reader.readexactly(int(head[at + 17 : end]))
    return int(head[9:12])


@dataclass(slots=True)
class _Window:
    start: float  # perf_counter: requests starting before this are warm-up
    end: float  # no request starts at or after this
    latencies: list[float]
    errors: int = 0
    answered: int = 0


async def _connection(host: str, port: int, request: bytes, window: _Window) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        while (t0 := time.perf_counter()) < window.end:
            writer.write(request)
            status = await _read_response(reader)
            t1 = time.perf_counter()
            window.answered += 1
            if t0 >= window.start:
                window.latencies.append(t1 - t0)
                window.errors += status != 200
    finally:
        writer.close()
        await writer.wait_closed()


async def _run(
    host: str, port: int, request: bytes, concurrency: int, *, warmup: float, seconds: float
) -> LoadResult:
    now = time.perf_counter()
    window = _Window(now + warmup, now + warmup + seconds, [])
    limit = warmup + seconds + _STALL_S
    try:
        async with asyncio.timeout(limit):
            await asyncio.gather(
                *(_connection(host, port, request, window) for _ in range(concurrency))
            )
    except TimeoutError:
        raise RuntimeError(f"the server stopped answering (no result within {limit:g} s)") from None
    window.latencies.sort()
    return LoadResult(
        len(window.latencies), window.errors, seconds, window.latencies, window.answered
    )


def run_load(
    url: str, path: str, body: bytes, *, concurrency: int, warmup: float, seconds: float
) -> LoadResult:
    """Drive ``POST url+path`` with ``concurrency`` keep-alive connections for a fixed time."""
    host, _, port = url.removeprefix("http://").rpartition(":")
    request = _request_bytes(host, int(port), path, body)
    return asyncio.run(_run(host, int(port), request, concurrency, warmup=warmup, seconds=seconds))
