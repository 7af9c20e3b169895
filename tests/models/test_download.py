"""The blob downloader against a real, misbehaving HTTP server: one stream, resumed (SPEC 13.3).

Every row asserts what the server served (requests, Range headers, body bytes), the final
digest, and that nothing but the blob is left beside it.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import blake3
import pytest
from servers.flaky_http import FlakyServer, Served

from gen_worker.errors import (
    DigestMismatchError,
    DownloadError,
    HubAuthError,
    HubNotFoundError,
)
from gen_worker.models.download import (
    BlobSource,
    DownloadPolicy,
    DownloadResult,
    download_blob,
    make_client,
)

SIZE = 512 << 10
NAME = "unet/diffusion_pytorch_model.safetensors"
FAST = DownloadPolicy(
    max_attempts=3,
    backoff_base_s=0.01,
    backoff_max_s=0.05,
    jitter_s=0.0,
    read_timeout_s=5.0,
    chunk_bytes=64 << 10,
    parallel_min_bytes=1 << 40,  # one stream: parallel ranges are tested elsewhere
)


@pytest.fixture
def server() -> Iterator[FlakyServer]:
    with FlakyServer() as s:
        yield s


@pytest.fixture
def data() -> bytes:
    return os.urandom(SIZE)


def b3(data: bytes) -> str:
    return blake3.blake3(data).hexdigest()


def source(url: str, data: bytes, **kwargs: Any) -> BlobSource:
    return BlobSource(NAME, url, len(data), **({"blake3": b3(data)} | kwargs))


def fetch(
    src: BlobSource,
    dest: Path,
    *,
    policy: DownloadPolicy = FAST,
    refresh_url: Callable[[], Awaitable[str]] | None = None,
    on_progress: Callable[[int], None] | None = None,
) -> DownloadResult:
    async def go() -> DownloadResult:
        async with make_client(policy) as client:
            return await download_blob(
                client, src, dest, policy=policy, refresh_url=refresh_url, on_progress=on_progress
            )

    return asyncio.run(go())


def listing(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def shape(requests: list[Served]) -> list[tuple[str | None, int]]:
    return [(r.range, r.status) for r in requests]


def assert_done(result: DownloadResult, dest: Path, data: bytes) -> None:
    assert dest.read_bytes() == data
    assert result.path == dest
    assert result.size_bytes == len(data)
    assert result.blake3 == b3(data)
    assert listing(dest.parent) == [dest.name]  # no .part, .state, .lock or temp file


def test_full_download_in_one_request(server: FlakyServer, data: bytes, tmp_path: Path) -> None:
    url = server.add("/blob", data)
    deltas: list[int] = []
    dest = tmp_path / "blob"
    result = fetch(
        source(url, data, sha256=hashlib.sha256(data).hexdigest()), dest, on_progress=deltas.append
    )
    assert_done(result, dest, data)
    assert result.sha256 == hashlib.sha256(data).hexdigest()
    assert (result.bytes_transferred, result.resumed_from) == (SIZE, 0)
    assert shape(server.requests) == [(None, 200)]
    assert server.bytes_served() == SIZE
    assert sum(deltas) == SIZE and all(d > 0 for d in deltas)
    assert dest.stat().st_mode & 0o777 == 0o644 & ~_umask()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_resume_asks_for_the_rest_only(server: FlakyServer, data: bytes, tmp_path: Path) -> None:
    url = server.add("/blob", data)
    dest = tmp_path / "blob"
    (tmp_path / "blob.part").write_bytes(data[:100_000])
    deltas: list[int] = []
    result = fetch(source(url, data), dest, on_progress=deltas.append)
    assert_done(result, dest, data)
    assert shape(server.requests) == [("bytes=100000-", 206)]
    assert server.bytes_served() == SIZE - 100_000
    assert (result.bytes_transferred, result.resumed_from) == (SIZE - 100_000, 100_000)
    assert sum(deltas) == SIZE  # the kept part counts once its resume is accepted


def test_a_server_ignoring_range_restarts_from_zero(
    server: FlakyServer, data: bytes, tmp_path: Path
) -> None:
    url = server.add("/blob", data)
    server.fault("ignore_range")
    dest = tmp_path / "blob"
    (tmp_path / "blob.part").write_bytes(data[:100_000])
    deltas: list[int] = []
    result = fetch(source(url, data), dest, on_progress=deltas.append)
    assert_done(result, dest, data)
    # The 200 body is the whole blob: used from byte 0, with no second request.
    assert shape(server.requests) == [("bytes=100000-", 200)]
    assert server.bytes_served() == SIZE
    assert (result.bytes_transferred, result.resumed_from) == (SIZE, 0)
    assert sum(deltas) == SIZE


def test_a_wrong_content_range_restarts_from_zero(
    server: FlakyServer, data: bytes, tmp_path: Path
) -> None:
    url = server.add("/blob", data)
    server.fault("wrong_range")  # answers bytes=100000- with 206 "bytes 0-.../size"
    dest = tmp_path / "blob"
    (tmp_path / "blob.part").write_bytes(data[:100_000])
    result = fetch(source(url, data), dest)
    assert_done(result, dest, data)
    assert shape(server.requests) == [("bytes=100000-", 206), (None, 200)]
    assert server.requests[1].sent == SIZE
    assert (result.bytes_transferred, result.resumed_from) == (SIZE, 0)


def test_a_resume_survives_a_redirect(server: FlakyServer, data: bytes, tmp_path: Path) -> None:
    url = server.add("/blob", data)
    server.fault("redirect")
    dest = tmp_path / "blob"
    (tmp_path / "blob.part").write_bytes(data[:100_000])
    result = fetch(source(url, data), dest)
    assert_done(result, dest, data)
    assert [(r.range, r.status, r.query) for r in server.requests] == [
        ("bytes=100000-", 302, ""),
        ("bytes=100000-", 206, "redirected=1"),
    ]


def test_a_lock_file_elsewhere_is_used_and_left_alone(
    server: FlakyServer, data: bytes, tmp_path: Path
) -> None:
    url = server.add("/blob", data)
    (tmp_path / "blobs").mkdir()
    dest = tmp_path / "blobs" / "blob"
    lock = tmp_path / "locks" / "blob.lock"

    async def go() -> DownloadResult:
        async with make_client(FAST) as client:
            return await download_blob(client, source(url, data), dest, policy=FAST, lock_path=lock)

    assert_done(asyncio.run(go()), dest, data)
    assert lock.exists()  # the caller's lock directory is the caller's to tidy


def test_a_dropped_connection_resumes_where_it_broke(
    server: FlakyServer, data: bytes, tmp_path: Path
) -> None:
    url = server.add("/blob", data)
    server.fault("drop", after_bytes=200_000)
    dest = tmp_path / "blob"
    result = fetch(source(url, data), dest)
    assert_done(result, dest, data)
    first, second = server.requests
    assert (first.range, first.status, first.sent, first.fault) == (None, 200, 200_000, "drop")
    assert second.range is not None and second.status == 206
    kept = int(second.range.removeprefix("bytes=").removesuffix("-"))
    assert 0 < kept <= 200_000  # a reset may lose bytes in flight, never more than were sent
    assert second.sent == SIZE - kept
    assert server.bytes_served() == SIZE + (200_000 - kept)
    assert result.bytes_transferred == SIZE


def test_a_clean_early_close_keeps_the_bytes_and_resumes(
    server: FlakyServer, data: bytes, tmp_path: Path
) -> None:
    url = server.add("/blob", data)
    server.fault("short", after_bytes=200_000)  # FIN after 200000 of 524288 promised bytes
    dest = tmp_path / "blob"
    result = fetch(source(url, data), dest)
    assert_done(result, dest, data)
    assert [(r.range, r.status, r.sent) for r in server.requests] == [
        (None, 200, 200_000),
        ("bytes=200000-", 206, SIZE - 200_000),
    ]
    assert server.bytes_served() == SIZE
    assert result.bytes_transferred == SIZE


def test_corrupt_bytes_are_downloaded_again_once(
    server: FlakyServer, data: bytes, tmp_path: Path
) -> None:
    url = server.add("/blob", data)
    server.fault("corrupt")  # once: the server then heals
    dest = tmp_path / "blob"
    result = fetch(source(url, data), dest)
    assert_done(result, dest, data)
    assert shape(server.requests) == [(None, 200), (None, 200)]
    assert server.bytes_served() == 2 * SIZE
    assert result.bytes_transferred == 2 * SIZE


def test_corrupt_bytes_twice_fail_naming_the_file_and_leave_nothing(
    server: FlakyServer, data: bytes, tmp_path: Path
) -> None:
    url = server.add("/blob", data)
    server.fault("corrupt", times=-1)
    dest = tmp_path / "blob"
    with pytest.raises(DigestMismatchError) as caught:
        fetch(source(url, data), dest)
    flipped = bytearray(data)
    flipped[SIZE // 2] ^= 0xFF
    assert (caught.value.name, caught.value.expected, caught.value.actual) == (
        NAME,
        b3(data),
        b3(bytes(flipped)),
    )
    assert str(caught.value).startswith(f"{NAME}: blake3 mismatch: expected {b3(data)}")
    assert shape(server.requests) == [(None, 200), (None, 200)]
    assert listing(tmp_path) == []


def test_a_size_other_than_the_manifests_is_a_mismatch(
    server: FlakyServer, data: bytes, tmp_path: Path
) -> None:
    url = server.add("/blob", data + b"extra")
    with pytest.raises(DigestMismatchError) as caught:
        fetch(source(url, data), tmp_path / "blob")
    assert str(caught.value) == f"{NAME}: size mismatch: expected {SIZE}, got {SIZE + 5}"
    assert len(server.requests) == 2  # discarded and tried once more
    assert listing(tmp_path) == []


def test_a_403_refreshes_the_url_once(server: FlakyServer, data: bytes, tmp_path: Path) -> None:
    url = server.add("/blob", data, signed=True)
    server.expire_signatures()
    refreshed: list[str] = []

    async def refresh() -> str:
        refreshed.append(server.signed_url("/blob"))
        return refreshed[-1]

    dest = tmp_path / "blob"
    result = fetch(source(url, data), dest, refresh_url=refresh)
    assert_done(result, dest, data)
    assert len(refreshed) == 1
    assert shape(server.requests) == [(None, 403), (None, 200)]
    assert server.requests[0].query == url.split("?")[1]
    assert server.requests[1].query == refreshed[0].split("?")[1]


def test_a_second_403_fails_without_showing_the_signature(
    server: FlakyServer, data: bytes, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = server.add("/blob", data, signed=True)
    server.fault("status", status=403, times=-1)
    calls: list[int] = []

    async def refresh() -> str:
        calls.append(1)
        return server.signed_url("/blob")

    with pytest.raises(HubAuthError) as caught:
        fetch(source(url, data), tmp_path / "blob", refresh_url=refresh)
    assert caught.value.status == 403
    assert str(caught.value) == (
        f"{NAME}: download refused (HTTP 403) by http://127.0.0.1:{server.port}/blob "
        "even after refreshing the URL once"
    )
    assert len(calls) == 1
    assert shape(server.requests) == [(None, 403), (None, 403)]
    assert "SECRETSIG" not in capsys.readouterr().err
    assert listing(tmp_path) == []


def test_a_403_without_a_refresh_fails_at_once(
    server: FlakyServer, data: bytes, tmp_path: Path
) -> None:
    url = server.add("/blob", data, signed=True)
    server.expire_signatures()
    with pytest.raises(HubAuthError, match=r"no way to refresh the URL was given") as caught:
        fetch(source(url, data), tmp_path / "blob")
    assert NAME in str(caught.value) and "SECRETSIG" not in str(caught.value)
    assert shape(server.requests) == [(None, 403)]


def test_a_404_fails_at_once(server: FlakyServer, data: bytes, tmp_path: Path) -> None:
    with pytest.raises(HubNotFoundError) as caught:
        fetch(source(server.url("/gone", "sig=SECRETSIG9"), data), tmp_path / "blob")
    assert caught.value.status == 404
    assert (
        str(caught.value) == f"{NAME}: not found (HTTP 404) at http://127.0.0.1:{server.port}/gone"
    )
    assert shape(server.requests) == [(None, 404)]
    assert listing(tmp_path) == []  # no empty .part for a refused download


def test_5xx_twice_then_ok(server: FlakyServer, data: bytes, tmp_path: Path) -> None:
    url = server.add("/blob", data)
    server.fault("status", status=503, times=2)
    dest = tmp_path / "blob"
    result = fetch(source(url, data), dest)
    assert_done(result, dest, data)
    assert shape(server.requests) == [(None, 503), (None, 503), (None, 200)]
    assert server.bytes_served() == SIZE


def test_retry_after_is_honoured_up_to_the_backoff_limit(
    server: FlakyServer, data: bytes, tmp_path: Path
) -> None:
    url = server.add("/blob", data)
    server.fault("status", status=503, retry_after="0.4")
    server.fault("status", status=429, retry_after="3600")
    policy = DownloadPolicy(
        backoff_base_s=0.01, backoff_max_s=0.6, jitter_s=0.0, parallel_min_bytes=1 << 40
    )
    dest = tmp_path / "blob"
    started = time.monotonic()
    result = fetch(source(url, data), dest, policy=policy)
    elapsed = time.monotonic() - started
    assert 0.4 + 0.6 <= elapsed < 3.0  # 0.4 s as asked, then an hour capped at 0.6 s
    assert_done(result, dest, data)
    assert shape(server.requests) == [(None, 503), (None, 429), (None, 200)]


def test_5xx_forever_fails_and_keeps_the_part_for_a_resume(
    server: FlakyServer, data: bytes, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = server.add("/blob", data, signed=True)
    server.fault("short", after_bytes=150_000)
    server.fault("status", status=502, times=-1)
    dest = tmp_path / "blob"
    with pytest.raises(DownloadError) as caught:
        fetch(source(url, data), dest)
    message = str(caught.value)
    assert message.startswith(f"{NAME}: download from http://127.0.0.1:{server.port}/blob failed")
    assert "failed 3 times in a row (HTTP 502)" in message and "keeps 150000 bytes" in message
    assert "SECRETSIG" not in message + capsys.readouterr().err
    # The early close made progress, so it starts the count of failures in a row: 1 + 2 x 502.
    assert shape(server.requests) == [(None, 200)] + [("bytes=150000-", 502)] * 2
    assert listing(tmp_path) == ["blob.part"]
    assert (tmp_path / "blob.part").read_bytes() == data[:150_000]

    server.clear_faults()
    server.reset_requests()
    result = fetch(source(url, data), dest)
    assert_done(result, dest, data)
    assert shape(server.requests) == [("bytes=150000-", 206)]
    assert result.resumed_from == 150_000


def test_a_stalled_body_hits_the_read_timeout_and_resumes(
    server: FlakyServer, data: bytes, tmp_path: Path
) -> None:
    url = server.add("/blob", data)
    server.fault("trickle", after_bytes=100_000, delay_s=5.0)
    policy = DownloadPolicy(
        backoff_base_s=0.01, jitter_s=0.0, read_timeout_s=0.3, parallel_min_bytes=1 << 40
    )
    dest = tmp_path / "blob"
    started = time.monotonic()
    result = fetch(source(url, data), dest, policy=policy)
    assert time.monotonic() - started < 3.0  # the timeout fired; the trickle was not waited out
    assert_done(result, dest, data)
    # The stalled request is still trickling on the server: it has not finished.
    assert [(r.range, r.status, r.sent, r.done) for r in server.requests_so_far()] == [
        (None, 200, 100_000, False),
        ("bytes=100000-", 206, SIZE - 100_000, True),
    ]


def test_a_complete_dest_is_returned_without_a_request(
    server: FlakyServer, data: bytes, tmp_path: Path
) -> None:
    url = server.add("/blob", data)
    dest = tmp_path / "blob"
    dest.write_bytes(data)
    deltas: list[int] = []
    result = fetch(source(url, data), dest, on_progress=deltas.append)
    assert result == DownloadResult(dest, SIZE, b3(data), "", 0, 0)
    assert server.requests == []
    assert deltas == [SIZE]


def test_a_dest_of_the_wrong_size_is_replaced(
    server: FlakyServer, data: bytes, tmp_path: Path
) -> None:
    url = server.add("/blob", data)
    dest = tmp_path / "blob"
    dest.write_bytes(b"truncated")
    result = fetch(source(url, data), dest)
    assert_done(result, dest, data)
    assert shape(server.requests) == [(None, 200)]


def test_an_empty_blob_needs_no_request(server: FlakyServer, tmp_path: Path) -> None:
    dest = tmp_path / "empty"
    result = fetch(source(server.url("/empty"), b""), dest)
    assert_done(result, dest, b"")
    assert server.requests == []


def test_a_sha256_only_source_is_checked_and_gets_its_blake3(
    server: FlakyServer, data: bytes, tmp_path: Path
) -> None:
    url = server.add("/blob", data)
    sha = hashlib.sha256(data).hexdigest()
    dest = tmp_path / "blob"
    result = fetch(BlobSource(NAME, url, SIZE, sha256=sha), dest)
    assert_done(result, dest, data)
    assert result.sha256 == sha

    wrong = "0" * 64
    with pytest.raises(DigestMismatchError, match=rf"^{NAME}: sha256 mismatch: expected {wrong}"):
        fetch(BlobSource(NAME, url, SIZE, sha256=wrong), tmp_path / "other")
    assert listing(tmp_path) == ["blob"]


def test_a_source_without_digests_is_checked_by_size(
    server: FlakyServer, data: bytes, tmp_path: Path
) -> None:
    url = server.add("/blob", data)
    dest = tmp_path / "blob"
    result = fetch(BlobSource(NAME, url, SIZE), dest)
    assert_done(result, dest, data)
    assert result.sha256 == ""
    # Already there: hashed (it has no blake3 name to trust), not downloaded again.
    server.reset_requests()
    again = fetch(BlobSource(NAME, url, SIZE), dest)
    assert again == DownloadResult(dest, SIZE, b3(data), "", 0, 0)
    assert server.requests == []

    with pytest.raises(DigestMismatchError, match=rf"^{NAME}: size mismatch: expected {SIZE - 1}"):
        fetch(BlobSource(NAME, url, SIZE - 1), tmp_path / "short")


def test_a_failing_progress_callback_is_logged_once_and_ignored(
    server: FlakyServer, data: bytes, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = server.add("/blob", data)
    calls: list[int] = []

    def broken(delta: int) -> None:
        calls.append(delta)
        raise RuntimeError("progress bar fell over")

    dest = tmp_path / "blob"
    result = fetch(source(url, data), dest, on_progress=broken)
    assert_done(result, dest, data)
    assert sum(calls) == SIZE and len(calls) > 1
    assert capsys.readouterr().err.count("download progress callback failed") == 1


def test_sources_and_policies_are_checked() -> None:
    with pytest.raises(ValueError, match=r"^w.bin: the download URL must be an http\(s\) URL"):
        BlobSource("w.bin", "ftp://h/w?sig=SECRETSIG1", 1)
    with pytest.raises(ValueError, match=r"^w.bin: blake3 'ABC' is not 64 lower-case hex"):
        BlobSource("w.bin", "http://h/w", 1, blake3="ABC")
    with pytest.raises(ValueError, match=r"^w.bin: size_bytes is -1; it must be >= 0"):
        BlobSource("w.bin", "http://h/w", -1, blake3="a" * 64)
    with pytest.raises(ValueError, match=r"^DownloadPolicy.range_workers is 0; it must be >= 1"):
        DownloadPolicy(range_workers=0)
    with pytest.raises(ValueError, match=r"^DownloadPolicy.read_timeout_s is 0; it must be > 0"):
        DownloadPolicy(read_timeout_s=0)
    with pytest.raises(
        ValueError, match=r"^DownloadPolicy.parallel_when_idle is -0.5; it must be >= 0"
    ):
        DownloadPolicy(parallel_when_idle=-0.5)
