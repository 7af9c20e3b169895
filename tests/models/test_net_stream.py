"""The downloader's network stream against a server that sends exactly the bytes a test scripts:
a response head reaches the HTTP client alone however the head is cut or framed, so the body
can skip the client (and the connection is then not reused); bodies the stream cannot take
(chunked) still arrive through the client, on a connection that is reused."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import blake3
import httpx
import pytest
from servers.flaky_http import FlakyServer

from gen_worker.models import net_stream, transfer
from gen_worker.models.download import (
    BlobSource,
    DownloadPolicy,
    DownloadResult,
    download_blob,
    make_client,
)

BODY = os.urandom(300_000)
HEAD = f"HTTP/1.1 200 OK\r\nContent-Length: {len(BODY)}\r\n\r\n".encode()
ONE_STREAM = DownloadPolicy(
    max_attempts=2,
    backoff_base_s=0.01,
    jitter_s=0.0,
    read_timeout_s=5.0,
    chunk_bytes=64 << 10,
    parallel_min_bytes=1 << 40,
)


class ScriptedServer:
    """Answers every request with ``pieces``, sent one by one a moment apart (so each is a
    read of its own), on keep-alive connections; counts connections and requests."""

    def __init__(self, pieces: list[bytes]) -> None:
        self.pieces = pieces
        self.connections = 0
        self.requests = 0
        self._sock = socket.create_server(("127.0.0.1", 0))
        self._sock.settimeout(0.05)  # accept() wakes up to see the server stopping
        self._threads: list[threading.Thread] = []
        self._stop = False

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._sock.getsockname()[1]}/blob"

    def __enter__(self) -> ScriptedServer:
        self._threads.append(threading.Thread(target=self._accept, daemon=True))
        self._threads[0].start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop = True
        for thread in self._threads:
            thread.join(timeout=5)
        self._sock.close()

    def _accept(self) -> None:
        while not self._stop:
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.settimeout(5.0)
            self.connections += 1
            thread = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _serve(self, conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):  # the client closes what it will not reuse
            received = b""
            while True:
                while b"\r\n\r\n" not in received:
                    data = conn.recv(65536)
                    if not data:
                        return
                    received += data
                received = received.split(b"\r\n\r\n", 1)[1]
                self.requests += 1
                for piece in self.pieces:
                    conn.sendall(piece)
                    time.sleep(0.02)


def fetch_twice(url: str, dest: Path, client: httpx.AsyncClient | None = None) -> DownloadResult:
    """Download the blob twice with one client (the second time into a fresh file)."""

    async def go() -> DownloadResult:
        async with client or make_client(ONE_STREAM) as session:
            source = BlobSource("w.bin", url, len(BODY), blake3.blake3(BODY).hexdigest())
            await download_blob(session, source, dest.with_name("first"), policy=ONE_STREAM)
            return await download_blob(session, source, dest, policy=ONE_STREAM)

    return asyncio.run(go())


@pytest.fixture
def taken(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[bool]]:
    """Whether each body was taken straight from its connection."""
    seen: list[bool] = []
    direct_body = net_stream.direct_body

    def spy(response: httpx.Response) -> Any:
        body = direct_body(response)
        seen.append(body is not None)
        return body

    monkeypatch.setattr(transfer, "direct_body", spy)
    yield seen


@pytest.mark.parametrize(
    "pieces",
    [
        pytest.param([HEAD + BODY], id="head-and-body-in-one-read"),
        pytest.param([HEAD[:-1], HEAD[-1:] + BODY], id="head-end-split-after-CRLF-CR"),
        pytest.param([HEAD[:-2], HEAD[-2:] + BODY[:10], BODY[10:]], id="head-end-split-mid"),
        pytest.param([HEAD[:-3], HEAD[-3:] + BODY], id="head-end-split-after-CRLF"),
        pytest.param(
            [b"HTTP/1.1 103 Early Hints\r\nLink: </a>; rel=preload\r\n\r\n" + HEAD + BODY],
            id="an-informational-head-first",
        ),
        pytest.param(
            [f"HTTP/1.1 200 OK\nContent-Length: {len(BODY)}\n\n".encode() + BODY],
            id="bare-LF-line-ends",
        ),
    ],
)
def test_a_head_reaches_the_client_alone_and_the_body_skips_it(
    pieces: list[bytes], tmp_path: Path, taken: list[bool]
) -> None:
    with ScriptedServer(pieces) as server:
        result = fetch_twice(server.url, tmp_path / "blob")
    assert (tmp_path / "first").read_bytes() == BODY and (tmp_path / "blob").read_bytes() == BODY
    assert (result.bytes_transferred, result.blake3) == (len(BODY), blake3.blake3(BODY).hexdigest())
    assert taken == [True, True]
    # The client never saw those bodies, so it did not reuse their connections.
    assert (server.requests, server.connections) == (2, 2)


def test_a_chunked_body_goes_through_the_client_on_a_reused_connection(
    tmp_path: Path, taken: list[bool]
) -> None:
    head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    chunks = [BODY[:100_000], BODY[100_000:]]
    body = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks) + b"0\r\n\r\n"
    with ScriptedServer([head, body]) as server:
        fetch_twice(server.url, tmp_path / "blob")
    assert (tmp_path / "first").read_bytes() == BODY and (tmp_path / "blob").read_bytes() == BODY
    assert taken == [False, False]
    assert (server.requests, server.connections) == (2, 1)


def test_a_client_of_the_callers_own_reads_bodies_through_httpx(
    tmp_path: Path, taken: list[bool]
) -> None:
    with FlakyServer() as server:
        url = server.add("/blob", BODY)
        result = fetch_twice(url, tmp_path / "blob", client=httpx.AsyncClient())
        assert server.bytes_served() == 2 * len(BODY)
    assert (tmp_path / "blob").read_bytes() == BODY and result.bytes_transferred == len(BODY)
    assert taken == [False, False]  # not the downloader's stream: no body to take


def test_the_buffer_pool_hands_back_kept_buffers_up_to_its_limit() -> None:
    pool = net_stream.BufferPool(keep_bytes=3 << 10)
    first, second = pool.take(1024), pool.take(1024)
    assert len(first) == len(second) == 1024 and first is not second
    big = pool.take(2048)
    for buffer in (first, second, big):
        pool.give_back(buffer)  # the 2 KiB one would pass the 3 KiB kept: dropped
    again = [pool.take(1024), pool.take(1024), pool.take(2048)]
    assert again[0] is second and again[1] is first  # the last given back comes out first
    assert again[2] is not big and len(again[2]) == 2048
