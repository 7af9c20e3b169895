"""Tests for input fetching (gen_worker.files.AssetFetcher) against a real local HTTP server."""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import blake3
import httpx
import pytest

from gen_worker.authoring import Asset
from gen_worker.errors import RetryableError, ValidationError
from gen_worker.files import DEFAULT_MAX_INPUT_FILE_BYTES, AssetFetcher
from gen_worker.files.urls import is_public_address, safe_name

RID = "req-1"
BODY = os.urandom(100_000)
SECRET = "SECRETSIGNATURE"


# --- a tiny purpose-built HTTP server -------------------------------------------------------


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        del format, args  # keep test output quiet

    def _head(self, status: int, headers: dict[str, str]) -> None:
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()

    def _send(self, status: int, body: bytes, content_type: str | None = None) -> None:
        headers = {"Content-Length": str(len(body))}
        if content_type:
            headers["Content-Type"] = content_type
        self._head(status, headers)
        self.wfile.write(body)

    def _unbounded(self, total: int | None) -> None:
        # No Content-Length: the body ends when the connection closes (or never).
        self.close_connection = True
        self._head(200, {"Connection": "close"})
        sent, chunk = 0, b"z" * 8192
        try:
            while total is None or sent < total:
                part = chunk if total is None else chunk[: total - sent]
                self.wfile.write(part)
                sent += len(part)
                if sent > 500_000_000 or self.server.stop.is_set():
                    return
        except (BrokenPipeError, ConnectionResetError):
            return

    def _stall(self) -> None:
        self._head(200, {"Content-Length": "100"})
        self.wfile.write(b"0123456789")
        self.wfile.flush()
        self.server.stop.wait(10)

    def _redirect(self, query: dict[str, list[str]]) -> None:
        # Without a target it redirects to itself: an endless loop.
        self._head(302, {"Location": query.get("to", ["/redirect"])[0], "Content-Length": "0"})

    def do_GET(self) -> None:
        self.server.hits.append(self.path)
        url = urlsplit(self.path)
        path, query = url.path, parse_qs(url.query)
        statuses = {"/missing": 404, "/gone": 410, "/forbidden": 403, "/error": 500, "/busy": 429}
        if path in statuses:
            self._send(statuses[path], b"nope")
        elif path == "/files/photo.png":
            self._send(200, BODY, "image/png; charset=binary")
        elif path == "/files/blob":
            self._send(200, b"RIFF....WEBP", "Image/WEBP; q=1")
        elif path == "/files/notes.txt":
            self._send(200, b"plain words")  # no Content-Type
        elif path == "/nolength":
            self._unbounded(int(query["n"][0]))
        elif path == "/endless":
            self._unbounded(None)
        elif path == "/biglength":
            self._head(200, {"Content-Length": str(10**12)})
            self.wfile.write(b"tiny")
            self.close_connection = True
        elif path == "/stall":
            self._stall()
        elif path == "/redirect":
            self._redirect(query)
        else:
            self._send(400, b"unknown route")


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.hits: list[str] = []
        self.stop = threading.Event()

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that gives up mid-body (the size limit, a timeout) resets the connection.
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


@pytest.fixture(scope="module")
def server() -> Iterator[_Server]:
    srv = _Server()
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.stop.set()
    srv.shutdown()
    srv.server_close()
    thread.join(5)


@pytest.fixture
def base(server: _Server) -> str:
    server.hits.clear()
    return f"http://127.0.0.1:{server.server_address[1]}"


def _fetch(root: Path, asset: Asset, index: int = 0, **kwargs: Any) -> None:
    async def go() -> None:
        kwargs.setdefault("allow_private_hosts", True)
        fetcher = AssetFetcher(root / "inputs", **kwargs)
        try:
            # A guard, so a fetch that fails to stop fails the test instead of hanging it.
            await asyncio.wait_for(fetcher.fetch(asset, RID, index), 30)
        finally:
            await fetcher.aclose()

    asyncio.run(go())


def _all_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file()] if root.exists() else []


def _check_digests(asset: Asset, data: bytes) -> None:
    assert asset.size_bytes == len(data)
    assert asset.sha256 == hashlib.sha256(data).hexdigest()
    assert asset.blake3 == blake3.blake3(data).hexdigest()


# --- downloads ------------------------------------------------------------------------------


def test_fetch_downloads_with_hashes(tmp_path: Path, base: str) -> None:
    asset = Asset(url=f"{base}/files/photo.png?sig={SECRET}", local_path="/etc/passwd")
    _fetch(tmp_path, asset, index=3)
    expected = (tmp_path / "inputs" / RID / "3-photo.png").resolve()
    assert asset.local_path == str(expected)
    assert expected.read_bytes() == BODY
    _check_digests(asset, BODY)
    assert asset.mime_type == "image/png"
    assert asset.url == f"{base}/files/photo.png?sig={SECRET}"  # the url itself is kept
    assert [p.name for p in _all_files(tmp_path)] == ["3-photo.png"]


def test_fetch_keeps_callers_mime_type_and_guesses_missing_one(tmp_path: Path, base: str) -> None:
    given = Asset(url=f"{base}/files/photo.png", mime_type="image/x-custom")
    _fetch(tmp_path, given)
    assert given.mime_type == "image/x-custom"
    guessed = Asset(url=f"{base}/files/notes.txt")
    _fetch(tmp_path, guessed, index=1)
    assert guessed.mime_type == "text/plain"
    _check_digests(guessed, b"plain words")


def test_mime_type_comes_from_content_type(tmp_path: Path, base: str) -> None:
    asset = Asset(url=f"{base}/files/blob")
    _fetch(tmp_path, asset)
    assert asset.mime_type == "image/webp"  # the name "0-blob" would not say so


def test_caller_local_path_is_cleared_even_on_failure(tmp_path: Path, base: str) -> None:
    asset = Asset(url=f"{base}/missing", local_path="/etc/shadow")
    with pytest.raises(ValidationError):
        _fetch(tmp_path, asset)
    assert asset.local_path is None


@pytest.mark.parametrize("path", ["/missing", "/gone"])
def test_not_found_is_validation_error_without_query(tmp_path: Path, base: str, path: str) -> None:
    with pytest.raises(ValidationError) as info:
        _fetch(tmp_path, Asset(url=f"{base}{path}?X-Amz-Signature={SECRET}"))
    assert str(info.value) == f"input file not found: {base}{path}"
    assert _all_files(tmp_path) == []


def test_other_client_error_is_validation_error(tmp_path: Path, base: str) -> None:
    with pytest.raises(ValidationError, match="HTTP 403") as info:
        _fetch(tmp_path, Asset(url=f"{base}/forbidden?token={SECRET}"))
    assert SECRET not in str(info.value)
    assert not isinstance(info.value, RetryableError)


@pytest.mark.parametrize(("path", "status"), [("/error", 500), ("/busy", 429)])
def test_server_error_is_retryable(tmp_path: Path, base: str, path: str, status: int) -> None:
    with pytest.raises(RetryableError, match=f"HTTP {status}") as info:
        _fetch(tmp_path, Asset(url=f"{base}{path}?sig={SECRET}"))
    assert SECRET not in str(info.value)
    assert info.value.retryable


def test_connection_refused_is_retryable(tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(RetryableError, match="could not be downloaded"):
        _fetch(tmp_path, Asset(url=f"http://127.0.0.1:{port}/x.png"))


def test_stalled_body_times_out_as_retryable(tmp_path: Path, base: str) -> None:
    started = time.monotonic()
    with pytest.raises(RetryableError, match="timed out"):
        _fetch(tmp_path, Asset(url=f"{base}/stall"), timeout_s=0.5)
    assert time.monotonic() - started < 8
    assert _all_files(tmp_path) == []  # the partial file is gone


LIMIT_MESSAGE = "is larger than the limit of 1000 bytes (WORKER_MAX_INPUT_FILE_BYTES)"


def test_oversize_with_content_length(tmp_path: Path, base: str) -> None:
    with pytest.raises(ValidationError, match=r"larger than the limit of 1000 bytes") as info:
        _fetch(tmp_path, Asset(url=f"{base}/files/photo.png"), max_bytes=1000)
    assert LIMIT_MESSAGE in str(info.value)
    assert _all_files(tmp_path) == []


def test_oversize_content_length_is_refused_up_front(tmp_path: Path, base: str) -> None:
    # The body is only 4 bytes: only the declared length can have caused the refusal.
    with pytest.raises(ValidationError) as info:
        _fetch(tmp_path, Asset(url=f"{base}/biglength"), max_bytes=1000)
    assert LIMIT_MESSAGE in str(info.value)
    assert _all_files(tmp_path) == []


def test_oversize_without_content_length(tmp_path: Path, base: str) -> None:
    with pytest.raises(ValidationError) as info:
        _fetch(tmp_path, Asset(url=f"{base}/nolength?n=5000"), max_bytes=1000)
    assert LIMIT_MESSAGE in str(info.value)
    assert _all_files(tmp_path) == []
    assert not any(p.name.endswith(".partial") for p in tmp_path.rglob("*"))


def test_body_without_content_length_within_limit(tmp_path: Path, base: str) -> None:
    asset = Asset(url=f"{base}/nolength?n=1000")
    _fetch(tmp_path, asset, max_bytes=1000)
    _check_digests(asset, b"z" * 1000)
    assert Path(str(asset.local_path)).name == "0-nolength"


def test_endless_body_stops_at_the_limit(tmp_path: Path, base: str) -> None:
    started = time.monotonic()
    with pytest.raises(ValidationError, match="larger than the limit of 65536 bytes"):
        _fetch(tmp_path, Asset(url=f"{base}/endless"), max_bytes=65536)
    assert time.monotonic() - started < 20
    assert _all_files(tmp_path) == []


def test_default_limit_is_200_mib() -> None:
    assert DEFAULT_MAX_INPUT_FILE_BYTES == 200 * 1024 * 1024


# --- URL and host checks ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "scheme"),
    [("file:///etc/passwd", "file"), ("ftp://example.com/a.png", "ftp"), ("gopher://x/", "gopher")],
)
def test_only_http_schemes(tmp_path: Path, url: str, scheme: str) -> None:
    with pytest.raises(ValidationError) as info:
        _fetch(tmp_path, Asset(url=url))
    assert f"scheme {scheme!r}" in str(info.value)
    assert "http(s)" in str(info.value)


@pytest.mark.parametrize("url", ["not a url at all", "http:///no-host", "http://[::1/x"])
def test_malformed_urls_are_validation_errors(tmp_path: Path, url: str) -> None:
    with pytest.raises(ValidationError):
        _fetch(tmp_path, Asset(url=url))


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "[::1]"])
def test_private_hosts_are_refused(tmp_path: Path, server: _Server, base: str, host: str) -> None:
    port = server.server_address[1]
    with pytest.raises(ValidationError) as info:
        _fetch(
            tmp_path,
            Asset(url=f"http://{host}:{port}/files/photo.png?sig={SECRET}"),
            allow_private_hosts=False,
        )
    message = str(info.value)
    assert "resolves to a private address; only public hosts are allowed" in message
    assert SECRET not in message
    assert server.hits == []  # refused before any request was sent


@pytest.mark.parametrize(
    ("address", "public"),
    [
        ("8.8.8.8", True),
        ("1.1.1.1", True),
        ("2606:4700:4700::1111", True),
        ("127.0.0.1", False),
        ("10.1.2.3", False),
        ("172.16.0.1", False),
        ("192.168.1.1", False),
        ("169.254.169.254", False),  # cloud metadata service
        ("100.64.0.1", False),  # carrier-grade NAT
        ("0.0.0.0", False),
        ("224.0.0.1", False),
        ("240.0.0.1", False),
        ("::1", False),
        ("::", False),
        ("fe80::1%eth0", False),
        ("fc00::1", False),
        ("ff02::1", False),
        ("::ffff:127.0.0.1", False),
        ("::ffff:10.0.0.1", False),
    ],
)
def test_is_public_address(address: str, public: bool) -> None:
    assert is_public_address(address) is public


def test_redirects_are_followed(tmp_path: Path, base: str, server: _Server) -> None:
    asset = Asset(url=f"{base}/redirect?to=/files/photo.png")
    _fetch(tmp_path, asset)
    _check_digests(asset, BODY)
    assert server.hits == ["/redirect?to=/files/photo.png", "/files/photo.png"]
    # The file is named after the URL the caller gave, not the redirect target.
    assert Path(str(asset.local_path)).name == "0-redirect"


def test_redirect_to_other_scheme_is_refused(tmp_path: Path, base: str) -> None:
    with pytest.raises(ValidationError, match="scheme 'file'"):
        _fetch(tmp_path, Asset(url=f"{base}/redirect?to=file:///etc/passwd"))


def test_redirect_loop_is_refused(tmp_path: Path, base: str, server: _Server) -> None:
    with pytest.raises(ValidationError, match="more than 5 redirects"):
        _fetch(tmp_path, Asset(url=f"{base}/redirect"))
    assert server.hits == ["/redirect"] * 6


@pytest.mark.parametrize(
    ("url", "name"),
    [
        ("https://h/a/b/photo.png?x=1", "photo.png"),
        ("https://h/", "input"),
        ("https://h", "input"),
        ("https://h/a/..hidden", "hidden"),
        ("https://h/we%20ird!%C3%A9.png", "we_ird__.png"),
        ("https://h/a%2F..%2Fname.png", "name.png"),  # %2F is a separator once decoded
        ("https://h/" + "x" * 300 + ".png", "x" * 96 + ".png"),
    ],
)
def test_safe_name(url: str, name: str) -> None:
    assert safe_name(httpx.URL(url)) == name


# --- local refs -------------------------------------------------------------------------------


@pytest.fixture
def store(tmp_path: Path) -> Path:
    root = tmp_path / "store"
    (root / "uploads").mkdir(parents=True)
    (root / "uploads" / "a.png").write_bytes(b"local png bytes")
    (tmp_path / "secret.txt").write_text("secret")
    return root


def test_local_ref_is_used_in_place(tmp_path: Path, store: Path) -> None:
    asset = Asset(ref="uploads/a.png", local_path="/etc/passwd")
    _fetch(tmp_path, asset, local_refs_root=store)
    assert asset.local_path == str((store / "uploads" / "a.png").resolve())
    _check_digests(asset, b"local png bytes")
    assert asset.mime_type == "image/png"
    assert not (tmp_path / "inputs").exists()  # no copy was made


def test_local_ref_missing(tmp_path: Path, store: Path) -> None:
    asset = Asset(ref="uploads/missing.png", local_path="/etc/passwd")
    with pytest.raises(ValidationError) as info:
        _fetch(tmp_path, asset, local_refs_root=store)
    assert str(info.value) == "input file not found: uploads/missing.png"
    assert asset.local_path is None
    with pytest.raises(ValidationError, match="input file not found: uploads"):
        _fetch(tmp_path, Asset(ref="uploads"), local_refs_root=store)  # a directory


@pytest.mark.parametrize(
    ("ref", "reason"),
    [
        ("../secret.txt", "'..' segment"),
        ("uploads/../../secret.txt", "'..' segment"),
        ("/etc/passwd", "absolute path"),
        ("uploads\\a.png", "backslash"),
        ("uploads//a.png", "empty segment"),
        ("", "empty"),
    ],
)
def test_local_ref_traversal_is_refused(tmp_path: Path, store: Path, ref: str, reason: str) -> None:
    asset = Asset(ref=ref)
    with pytest.raises(ValidationError, match=reason) as info:
        _fetch(tmp_path, asset, local_refs_root=store)
    assert "input ref" in str(info.value)
    assert asset.local_path is None


def test_local_ref_symlink_escape_is_refused(tmp_path: Path, store: Path) -> None:
    (store / "uploads" / "link.txt").symlink_to(tmp_path / "secret.txt")
    asset = Asset(ref="uploads/link.txt")
    with pytest.raises(ValidationError, match="outside the local file store"):
        _fetch(tmp_path, asset, local_refs_root=store)
    assert asset.local_path is None


def test_local_ref_over_the_limit(tmp_path: Path, store: Path) -> None:
    with pytest.raises(ValidationError, match="larger than the limit of 4 bytes"):
        _fetch(tmp_path, Asset(ref="uploads/a.png"), local_refs_root=store, max_bytes=4)


def test_ref_without_a_local_store_needs_a_hub(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="TENSORHUB_URL"):
        _fetch(tmp_path, Asset(ref="uploads/a.png"))


def test_asset_without_url_or_ref(tmp_path: Path) -> None:
    asset = Asset(local_path="/etc/passwd")
    with pytest.raises(ValidationError) as info:
        _fetch(tmp_path, asset)
    assert str(info.value) == "an input Asset needs a url or a ref"
    assert asset.local_path is None


def test_unsafe_request_id_is_refused(tmp_path: Path, base: str) -> None:
    async def go() -> None:
        fetcher = AssetFetcher(tmp_path / "inputs", allow_private_hosts=True)
        try:
            await fetcher.fetch(Asset(url=f"{base}/files/photo.png"), "../escape", 0)
        finally:
            await fetcher.aclose()

    with pytest.raises(ValidationError, match="request id"):
        asyncio.run(go())
    assert _all_files(tmp_path) == []


# --- fetch_all, cleanup, aclose ---------------------------------------------------------------


def test_fetch_all_and_cleanup(tmp_path: Path, base: str, store: Path) -> None:
    assets = [
        Asset(url=f"{base}/files/photo.png"),
        Asset(ref="uploads/a.png"),
        Asset(url=f"{base}/files/notes.txt"),
    ]
    other = tmp_path / "inputs" / "other-request"
    other.mkdir(parents=True)
    (other / "keep.bin").write_bytes(b"keep")

    async def go() -> None:
        fetcher = AssetFetcher(tmp_path / "inputs", allow_private_hosts=True, local_refs_root=store)
        try:
            await fetcher.fetch_all(assets, RID)
            assert Path(str(assets[0].local_path)).name == "0-photo.png"
            assert assets[1].local_path == str((store / "uploads" / "a.png").resolve())
            assert Path(str(assets[2].local_path)).name == "2-notes.txt"
            _check_digests(assets[0], BODY)
            _check_digests(assets[2], b"plain words")
            fetcher.cleanup(RID)
            fetcher.cleanup(RID)  # nothing left: no error
        finally:
            await fetcher.aclose()

    asyncio.run(go())
    assert not (tmp_path / "inputs" / RID).exists()
    assert (other / "keep.bin").read_bytes() == b"keep"
    assert (store / "uploads" / "a.png").exists()  # local refs are never removed


def test_fetch_all_reports_the_failure(tmp_path: Path, base: str) -> None:
    assets = [Asset(url=f"{base}/files/photo.png"), Asset(url=f"{base}/missing")]

    async def go() -> None:
        fetcher = AssetFetcher(tmp_path / "inputs", allow_private_hosts=True)
        try:
            await fetcher.fetch_all(assets, RID)
        finally:
            await fetcher.aclose()

    with pytest.raises(ValidationError, match="input file not found"):
        asyncio.run(go())
    assert assets[1].local_path is None


def test_cleanup_refuses_unsafe_request_id(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.mkdir()
    fetcher = AssetFetcher(tmp_path / "inputs" / "x")
    try:
        with pytest.raises(ValidationError):
            fetcher.cleanup("../../victim")
    finally:
        asyncio.run(fetcher.aclose())
    assert victim.exists()


def test_aclose_leaves_a_given_client_open(tmp_path: Path, base: str) -> None:
    async def go() -> None:
        async with httpx.AsyncClient() as client:
            fetcher = AssetFetcher(tmp_path / "inputs", allow_private_hosts=True, client=client)
            await fetcher.fetch(Asset(url=f"{base}/files/notes.txt"), RID, 0)
            await fetcher.aclose()
            assert not client.is_closed
            assert (await client.get(f"{base}/files/notes.txt")).content == b"plain words"

    asyncio.run(go())
