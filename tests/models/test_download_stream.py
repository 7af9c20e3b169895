"""The downloader's own network stream: TLS through asyncio (the server's certificate verified,
ranges and single streams served as over plain HTTP), and a disk slower than the network
(the socket's reading paused while no block is free, no byte lost)."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import os
import re
import ssl
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import blake3
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from servers.flaky_http import FlakyServer

from gen_worker.errors import DownloadError
from gen_worker.models import blob_io, net_stream
from gen_worker.models.download import (
    BlobSource,
    DownloadPolicy,
    DownloadResult,
    download_blob,
    make_client,
)

DATA = os.urandom(700_000)
RANGED = DownloadPolicy(
    max_attempts=2,
    backoff_base_s=0.01,
    jitter_s=0.0,
    read_timeout_s=5.0,
    chunk_bytes=32 << 10,
    parallel_min_bytes=256 << 10,
    range_bytes=256 << 10,
    range_workers=3,
)
ONE_STREAM = DownloadPolicy(
    max_attempts=2, backoff_base_s=0.01, jitter_s=0.0, read_timeout_s=5.0, range_workers=1
)


@dataclass
class TlsServer:
    url: str
    ca_file: Path
    seen: list[tuple[str | None, bool]] = field(default_factory=list)  # (Range, over TLS)


def _self_signed(directory: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = directory / "cert.pem", directory / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_file, key_file


@pytest.fixture
def server(tmp_path: Path) -> Iterator[TlsServer]:
    cert_file, key_file = _self_signed(tmp_path)
    seen: list[tuple[str | None, bool]] = []

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            del format, args

        def do_GET(self) -> None:
            asked = self.headers.get("Range")
            seen.append((asked, isinstance(self.connection, ssl.SSLSocket)))
            match = re.fullmatch(r"bytes=(\d+)-(\d*)", asked or "")
            first, last = 0, len(DATA) - 1
            if match:
                first = int(match[1])
                last = min(int(match[2] or last), last)
            self.send_response(206 if match else 200)
            self.send_header("Content-Length", str(last - first + 1))
            if match:
                self.send_header("Content-Range", f"bytes {first}-{last}/{len(DATA)}")
            self.end_headers()
            self.wfile.write(DATA[first : last + 1])

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_file, key_file)
    # The handshake happens in each request's thread, so a client that never completes one
    # cannot hold up the accepting thread (and the shutdown).
    httpd.socket = context.wrap_socket(
        httpd.socket, server_side=True, do_handshake_on_connect=False
    )
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield TlsServer(f"https://127.0.0.1:{httpd.server_address[1]}/blob", cert_file, seen)
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


def fetch(url: str, dest: Path, policy: DownloadPolicy) -> DownloadResult:
    async def go() -> DownloadResult:
        async with make_client(policy) as client:
            source = BlobSource("w.bin", url, len(DATA), blake3.blake3(DATA).hexdigest())
            return await download_blob(client, source, dest, policy=policy)

    return asyncio.run(go())


@pytest.mark.parametrize(
    ("policy", "ranges"),
    [
        (RANGED, {"bytes=0-262143", "bytes=262144-524287", "bytes=524288-699999"}),
        (ONE_STREAM, {None}),
    ],
)
def test_a_blob_downloads_over_tls(
    server: TlsServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    policy: DownloadPolicy,
    ranges: set[str | None],
) -> None:
    monkeypatch.setenv("SSL_CERT_FILE", str(server.ca_file))  # httpx trusts our own CA only
    handshakes: list[str | None] = []
    start_tls = net_stream._Stream.start_tls

    async def spy(
        self: Any,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> Any:
        handshakes.append(server_hostname)
        return await start_tls(self, ssl_context, server_hostname, timeout)

    monkeypatch.setattr(net_stream._Stream, "start_tls", spy)
    dest = tmp_path / "blob"
    result = fetch(server.url, dest, policy)
    # Through the downloader's own stream: a handshake per connection, and each body went
    # straight to the downloader, so no connection served a second request.
    assert handshakes == ["127.0.0.1"] * len(ranges)
    assert dest.read_bytes() == DATA
    assert (result.blake3, result.bytes_transferred) == (blake3.blake3(DATA).hexdigest(), len(DATA))
    assert {asked for asked, _ in server.seen} == ranges and len(server.seen) == len(ranges)
    assert {tls for _, tls in server.seen} == {True}


def test_an_untrusted_certificate_is_refused(
    server: TlsServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "other").mkdir()
    other, _ = _self_signed(tmp_path / "other")
    monkeypatch.setenv("SSL_CERT_FILE", str(other))  # a CA that did not sign the server's cert
    with pytest.raises(DownloadError, match=r"failed 2 times in a row \(ConnectError\)"):
        fetch(server.url, tmp_path / "blob", ONE_STREAM)
    assert server.seen == []  # no request ever reached the server


def test_a_slow_disk_pauses_the_socket_without_losing_a_byte(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = os.urandom(6 << 20)
    pauses: list[bool] = []
    reading = net_stream._Receiver._reading
    write_block = blob_io._write_block

    def spy(self: Any, *, pause: bool) -> None:
        pauses.append(pause)
        reading(self, pause=pause)

    def slow(*args: Any) -> int:
        time.sleep(0.01)  # a disk slower than loopback: the blocks fill up
        return write_block(*args)

    monkeypatch.setattr(net_stream._Receiver, "_reading", spy)
    monkeypatch.setattr(blob_io, "_write_block", slow)
    with FlakyServer() as server:
        url = server.add("/blob", data)
        dest = tmp_path / "blob"

        policy = replace(ONE_STREAM, chunk_bytes=512 << 10)  # twelve blocks, four at a time

        async def go() -> DownloadResult:
            async with make_client(policy) as client:
                source = BlobSource("w.bin", url, len(data), blake3.blake3(data).hexdigest())
                return await download_blob(client, source, dest, policy=policy)

        result = asyncio.run(go())
        assert dest.read_bytes() == data
        assert (result.bytes_transferred, server.bytes_served()) == (len(data), len(data))
    # Every block full (the writer behind), the reading stopped until one was on disk again;
    # each resume followed a pause, never two of either in a row.
    assert pauses[:2] == [True, False]
    assert pauses == [True, False] * (len(pauses) // 2) + [True] * (len(pauses) % 2)


def test_a_block_reaches_the_kernel_in_bounded_writes_whatever_its_pieces(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    limit = blob_io._WRITE_BYTES
    pieces = [os.urandom(n) for n in (10, limit - 10, 3 * limit + 5, 7, limit)]
    data = b"".join(pieces)
    calls: list[int] = []
    pwritev = os.pwritev

    def short(fd: int, views: list[memoryview], offset: int) -> int:
        calls.append(sum(v.nbytes for v in views))
        if len(calls) == 2:  # one short write: the rest must follow it
            return pwritev(fd, [views[0][:100]], offset)
        return pwritev(fd, views, offset)

    monkeypatch.setattr(os, "pwritev", short)
    path = tmp_path / "blob.part"
    fd = os.open(path, os.O_RDWR | os.O_CREAT)
    try:
        inline = blob_io.InlineHash(False)
        mixed: list[bytes | memoryview] = [pieces[0], memoryview(pieces[1]), *pieces[2:]]
        assert blob_io._write_block(fd, mixed, 50, inline) == len(data)
    finally:
        os.close(fd)
    assert path.read_bytes() == bytes(50) + data
    assert calls == [limit] * 5 + [12] and sum(calls) == len(data)
    assert (inline.upto, inline.digests().blake3) == (len(data), blake3.blake3(data).hexdigest())
