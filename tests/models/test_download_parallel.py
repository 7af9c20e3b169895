"""Parallel byte ranges: bounded workers, the ``.part.state`` sidecar, and the fall back to one
stream when the server ignores Range (SPEC 13.3)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import blake3
import pytest
from servers.flaky_http import FlakyServer

from gen_worker.errors import DownloadError, HubNotFoundError
from gen_worker.models import blob_io, ranges
from gen_worker.models.download import (
    BlobSource,
    DownloadPolicy,
    DownloadResult,
    download_blob,
    make_client,
)
from gen_worker.models.ranges import completed_ranges

STEP = 128 << 10
SIZE = 8 * STEP + 1000  # nine ranges, the last one short
NAME = "text_encoder/model.safetensors"
POLICY = DownloadPolicy(
    max_attempts=2,
    backoff_base_s=0.01,
    backoff_max_s=0.05,
    jitter_s=0.0,
    read_timeout_s=5.0,
    chunk_bytes=32 << 10,
    parallel_min_bytes=256 << 10,
    range_bytes=STEP,
    range_workers=4,
    parallel_when_idle=0,  # every worker at once (the choice is tested below)
)
ALL_RANGES = {f"bytes={s}-{min(s + STEP, SIZE) - 1}" for s in range(0, SIZE, STEP)}


@pytest.fixture
def server() -> Iterator[FlakyServer]:
    with FlakyServer() as s:
        yield s


@pytest.fixture
def data() -> bytes:
    return os.urandom(SIZE)


def source(url: str, data: bytes) -> BlobSource:
    return BlobSource(
        NAME, url, len(data), blake3.blake3(data).hexdigest(), hashlib.sha256(data).hexdigest()
    )


def fetch(
    src: BlobSource,
    dest: Path,
    *,
    refresh_url: Callable[[], Awaitable[str]] | None = None,
    on_progress: Callable[[int], None] | None = None,
    policy: DownloadPolicy = POLICY,
) -> DownloadResult:
    async def go() -> DownloadResult:
        async with make_client(policy) as client:
            return await download_blob(
                client, src, dest, policy=policy, refresh_url=refresh_url, on_progress=on_progress
            )

    return asyncio.run(go())


def assert_done(result: DownloadResult, dest: Path, data: bytes) -> None:
    assert dest.read_bytes() == data
    assert (result.blake3, result.sha256) == (
        blake3.blake3(data).hexdigest(),
        hashlib.sha256(data).hexdigest(),
    )
    assert sorted(p.name for p in dest.parent.iterdir()) == [dest.name]


def test_a_large_blob_downloads_as_ranges(server: FlakyServer, data: bytes, tmp_path: Path) -> None:
    url = server.add("/blob", data)
    deltas: list[int] = []
    dest = tmp_path / "blob"
    result = fetch(source(url, data), dest, on_progress=deltas.append)
    assert_done(result, dest, data)
    requests = server.requests
    assert {r.range for r in requests} == ALL_RANGES and len(requests) == len(ALL_RANGES)
    assert {r.status for r in requests} == {206}
    assert server.bytes_served() == SIZE
    assert (result.bytes_transferred, result.resumed_from) == (SIZE, 0)
    assert sum(deltas) == SIZE and min(deltas) > 0


def test_a_server_ignoring_range_gets_one_stream(
    server: FlakyServer, data: bytes, tmp_path: Path
) -> None:
    url = server.add("/blob", data)
    server.fault("ignore_range", times=-1)
    dest = tmp_path / "blob"
    result = fetch(source(url, data), dest)
    assert_done(result, dest, data)
    # The first range request is the probe; its 200 sends the download back to one stream.
    assert [(r.range, r.status) for r in server.requests] == [
        (f"bytes=0-{STEP - 1}", 200),
        (None, 200),
    ]
    assert server.requests[1].sent == SIZE
    assert result.resumed_from == 0


def test_a_wrong_content_range_mid_way_falls_back_to_one_stream(
    server: FlakyServer, data: bytes, tmp_path: Path
) -> None:
    url = server.add("/blob", data)
    server.fault("wrong_range", range_start=5 * STEP)
    dest = tmp_path / "blob"
    result = fetch(source(url, data), dest)
    assert_done(result, dest, data)
    requests = server.requests
    assert any(r.range == f"bytes={5 * STEP}-{6 * STEP - 1}" and r.fault for r in requests)
    assert (requests[-1].range, requests[-1].status, requests[-1].sent) == (None, 200, SIZE)


def test_a_failing_range_keeps_the_others_for_a_resume(
    server: FlakyServer, data: bytes, tmp_path: Path
) -> None:
    url = server.add("/blob", data)
    bad = f"bytes={3 * STEP}-{4 * STEP - 1}"
    server.fault("status", status=500, times=-1, range_start=3 * STEP)
    dest = tmp_path / "blob"
    with pytest.raises(DownloadError) as caught:
        fetch(source(url, data), dest)
    assert str(caught.value).startswith(
        f"{NAME} ({bad.replace('=', ' ')}): download from http://127.0.0.1:{server.port}/blob "
        "failed 2 times in a row (HTTP 500)"
    )
    assert [r.status for r in server.requests if r.range == bad] == [500, 500]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blob.part", "blob.part.state"]
    done = completed_ranges(tmp_path / "blob.part.state")
    assert done and done[0][0] == 0
    assert all(not (s <= 3 * STEP < e) for s, e in done)  # the failed range is not recorded
    part = (tmp_path / "blob.part").read_bytes()
    assert len(part) == SIZE
    assert all(part[s:e] == data[s:e] for s, e in done)

    server.clear_faults()
    server.reset_requests()
    result = fetch(source(url, data), dest)
    assert_done(result, dest, data)
    covered = sum(e - s for s, e in done)
    missing = {r for r in ALL_RANGES if not any(s <= int(r[6:].split("-")[0]) < e for s, e in done)}
    assert {r.range for r in server.requests} == missing and len(server.requests) == len(missing)
    assert bad in missing
    assert server.bytes_served() == SIZE - covered
    assert (result.resumed_from, result.bytes_transferred) == (covered, SIZE - covered)


def test_a_sequential_partial_file_is_resumed_by_ranges(
    server: FlakyServer, data: bytes, tmp_path: Path
) -> None:
    url = server.add("/blob", data)
    (tmp_path / "blob.part").write_bytes(data[:300_000])  # left by a one-stream download
    dest = tmp_path / "blob"
    result = fetch(source(url, data), dest)
    assert_done(result, dest, data)
    expected = {f"bytes=300000-{3 * STEP - 1}"} | {
        r for r in ALL_RANGES if int(r[6:].split("-")[0]) >= 3 * STEP
    }
    assert {r.range for r in server.requests} == expected
    assert server.bytes_served() == SIZE - 300_000
    assert result.resumed_from == 300_000


def test_a_stale_sidecar_is_ignored(server: FlakyServer, data: bytes, tmp_path: Path) -> None:
    url = server.add("/blob", data)
    (tmp_path / "blob.part").write_bytes(os.urandom(SIZE))
    (tmp_path / "blob.part.state").write_bytes(b'{"version": 1, "size_bytes": 5}')
    dest = tmp_path / "blob"
    result = fetch(source(url, data), dest)
    assert_done(result, dest, data)
    assert {r.range for r in server.requests} == ALL_RANGES
    assert result.resumed_from == 0


def test_a_corrupt_range_downloads_everything_again_once(
    server: FlakyServer, data: bytes, tmp_path: Path
) -> None:
    url = server.add("/blob", data)
    middle = (SIZE // 2) // STEP * STEP  # the range holding the byte the fault flips
    server.fault("corrupt", range_start=middle)
    dest = tmp_path / "blob"
    result = fetch(source(url, data), dest)
    assert_done(result, dest, data)
    assert len(server.requests) == 2 * len(ALL_RANGES)
    assert result.bytes_transferred == 2 * SIZE


def test_403_on_every_range_refreshes_the_url_once(
    server: FlakyServer, data: bytes, tmp_path: Path
) -> None:
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
    statuses = [(r.status, r.query == refreshed[0].split("?")[1]) for r in server.requests]
    assert statuses.count((403, False)) == 1  # only the probe saw the expired URL
    assert statuses.count((206, True)) == len(ALL_RANGES)


def test_a_404_mid_way_stops_every_range(server: FlakyServer, data: bytes, tmp_path: Path) -> None:
    url = server.add("/blob", data)
    server.fault("status", status=404, times=-1, range_start=2 * STEP)
    with pytest.raises(HubNotFoundError, match=rf"^{NAME}: not found \(HTTP 404\)"):
        fetch(source(url, data), tmp_path / "blob")
    assert [r.status for r in server.requests].count(404) == 1


def test_a_resume_fetches_only_the_gaps_between_written_intervals(
    server: FlakyServer, data: bytes, tmp_path: Path
) -> None:
    url = server.add("/blob", data)
    src = source(url, data)
    written = [(0, 100_000), (150_000, 200_000), (5 * STEP, 5 * STEP + 10)]
    part = bytearray(SIZE)  # a killed download's partial file: its gaps hold zeros
    for start, end in written:
        part[start:end] = data[start:end]
    (tmp_path / "blob.part").write_bytes(part)
    state = {
        "version": 1,
        "size_bytes": SIZE,
        "blake3": src.blake3,
        "sha256": src.sha256,
        "done": [list(interval) for interval in written],
    }
    (tmp_path / "blob.part.state").write_bytes(json.dumps(state).encode().ljust(4096))
    dest = tmp_path / "blob"
    result = fetch(src, dest)
    assert_done(result, dest, data)
    kept = sum(end - start for start, end in written)
    gaps = {
        f"bytes=100000-{STEP - 1}",
        f"bytes={STEP}-149999",
        f"bytes=200000-{2 * STEP - 1}",
        f"bytes={5 * STEP + 10}-{6 * STEP - 1}",
    }
    # Ranges 0, 1 and 5 held written bytes: only their gaps travel; the others whole.
    untouched = {
        f"bytes={s}-{min(s + STEP, SIZE) - 1}" for s in range(0, SIZE, STEP) if s // STEP > 1
    } - {f"bytes={5 * STEP}-{6 * STEP - 1}"}
    requests = [r.range for r in server.requests]
    assert set(requests) == gaps | untouched and len(requests) == len(gaps | untouched)
    assert (result.resumed_from, server.bytes_served()) == (kept, SIZE - kept)


@pytest.fixture
def watched(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """The most ranges under way at once, and the bytes hashed by reading the file back."""
    seen = {"ranges": 0, "most": 0, "read_back": 0}
    fetch_range = ranges._Parallel._fetch
    hash_span = blob_io.PrefixHash._hash_span

    async def counting(self: Any, fd: int, item: Any) -> None:
        seen["ranges"] += 1
        seen["most"] = max(seen["most"], seen["ranges"])
        try:
            await fetch_range(self, fd, item)
        finally:
            seen["ranges"] -= 1

    def reading(self: Any, end: int) -> None:
        before = self._hash.upto
        hash_span(self, end)
        seen["read_back"] += self._hash.upto - before

    monkeypatch.setattr(ranges._Parallel, "_fetch", counting)
    monkeypatch.setattr(blob_io.PrefixHash, "_hash_span", reading)
    return seen


def test_a_busy_event_loop_gets_no_helpers_and_hashes_as_it_writes(
    server: FlakyServer,
    data: bytes,
    tmp_path: Path,
    watched: dict[str, int],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    url = server.add("/blob", data)
    server.fault("trickle", piece_bytes=16 << 10, delay_s=0.01, times=-1)  # ~1.6 MB/s each
    # The loop never idle (a CPU that is the limit): the first stream is left alone, however
    # slow it is.
    monkeypatch.setattr(ranges, "busy_s", time.monotonic)
    dest = tmp_path / "blob"
    result = fetch(source(url, data), dest, policy=replace(POLICY, parallel_when_idle=0.5))
    assert_done(result, dest, data)
    assert watched["most"] == 1  # one range at a time, in order...
    assert watched["read_back"] == 0  # ...so each block was hashed by its writer, from memory
    # Alone, the worker asked for up to 4 ranges at once: the file once, in fewer requests.
    asked = [
        tuple(int(b) for b in r.range.removeprefix("bytes=").split("-"))
        for r in server.requests
        if r.range
    ]
    assert len(asked) == len(server.requests) < len(ALL_RANGES)
    assert [first for first, _ in asked] == [0] + [last + 1 for _, last in asked[:-1]]
    assert asked[-1][1] == SIZE - 1
    assert max(last + 1 - first for first, last in asked) == 4 * STEP


def test_a_stream_the_network_holds_back_gets_helpers(
    server: FlakyServer, data: bytes, tmp_path: Path, watched: dict[str, int]
) -> None:
    url = server.add("/blob", data)
    server.fault("trickle", piece_bytes=16 << 10, delay_s=0.01, times=-1)  # ~1.6 MB/s each
    dest = tmp_path / "blob"
    result = fetch(source(url, data), dest, policy=replace(POLICY, parallel_when_idle=0.5))
    assert_done(result, dest, data)
    assert {r.range for r in server.requests} == ALL_RANGES and len(server.requests) == 9
    assert watched["most"] == POLICY.range_workers
    assert watched["read_back"] > 0  # the later ranges' blocks were not next in line


def test_busy_seconds_count_running_not_sleeping() -> None:
    before = ranges.busy_s()
    time.sleep(0.2)
    slept = ranges.busy_s() - before
    before, until = ranges.busy_s(), time.monotonic() + 0.2
    while time.monotonic() < until:
        pass
    spun = ranges.busy_s() - before
    assert slept < 0.1 and spun > 0.15
