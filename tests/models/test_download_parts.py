"""A file published as parts, downloaded whole: each part's bytes written at its offset of one
partial file (so nothing is written twice), checked as one file, the culprit named when a part
is wrong, resumed after a kill (SPEC 13.2, 13.3)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import blake3
import msgspec
import pytest
from servers.flaky_http import FlakyServer

from gen_worker.errors import DigestMismatchError, DownloadError
from gen_worker.models import parts as parts_module
from gen_worker.models.download import (
    BlobSource,
    DownloadPolicy,
    DownloadResult,
    Target,
    download_parts,
    make_client,
)
from gen_worker.models.fetch import SnapshotFetcher
from gen_worker.models.manifest import SnapshotManifest
from gen_worker.models.ranges import completed_ranges
from gen_worker.models.store import Store

from .test_store_support import blob_files, entry, files_under, manifest_of, put, split

STEP = 64 << 10
SIZES = [200_000, 150_000, 100_000]  # not multiples of STEP: short last range in each part
NAME = "unet/w.bin"
POLICY = DownloadPolicy(
    max_attempts=2,
    backoff_base_s=0.01,
    backoff_max_s=0.05,
    jitter_s=0.0,
    read_timeout_s=5.0,
    chunk_bytes=16 << 10,
    parallel_min_bytes=256 << 10,
    range_bytes=STEP,
    range_workers=3,
)
ONE_STREAM = DownloadPolicy(
    max_attempts=2, backoff_base_s=0.01, jitter_s=0.0, read_timeout_s=5.0, range_workers=1
)


def b3(data: bytes) -> str:
    return blake3.blake3(data).hexdigest()


@pytest.fixture
def server() -> Iterator[FlakyServer]:
    with FlakyServer() as s:
        yield s


@pytest.fixture
def chunks() -> list[bytes]:
    return [os.urandom(size) for size in SIZES]


def serve(server: FlakyServer, chunks: list[bytes], *, signed: bool = False) -> list[BlobSource]:
    return [
        BlobSource(f"{NAME}.part{i:04d}", server.add(f"/p{i}", c, signed=signed), len(c), b3(c))
        for i, c in enumerate(chunks)
    ]


def target(chunks: list[bytes]) -> Target:
    whole = b"".join(chunks)
    return Target(NAME, len(whole), b3(whole))


def fetch(
    whole: Target,
    parts: list[BlobSource],
    dest: Path,
    *,
    policy: DownloadPolicy = POLICY,
    refresh_url: Callable[[BlobSource], Awaitable[str]] | None = None,
    on_progress: Callable[[int], None] | None = None,
) -> DownloadResult:
    async def go() -> DownloadResult:
        async with make_client(policy) as client:
            return await download_parts(
                client,
                whole,
                parts,
                dest,
                policy=policy,
                refresh_url=refresh_url,
                on_progress=on_progress,
            )

    return asyncio.run(go())


def ranges_of(size: int) -> set[str]:
    return {f"bytes={s}-{min(s + STEP, size) - 1}" for s in range(0, size, STEP)}


def assert_done(result: DownloadResult, dest: Path, chunks: list[bytes]) -> None:
    whole = b"".join(chunks)
    assert dest.read_bytes() == whole
    assert (result.path, result.size_bytes, result.blake3) == (dest, len(whole), b3(whole))
    assert sorted(p.name for p in dest.parent.iterdir()) == [dest.name]  # no part kept


def test_each_part_is_written_at_its_offset_in_ranges(
    server: FlakyServer, chunks: list[bytes], tmp_path: Path
) -> None:
    parts = serve(server, chunks)
    deltas: list[int] = []
    dest = tmp_path / "whole"
    result = fetch(target(chunks), parts, dest, on_progress=deltas.append)
    assert_done(result, dest, chunks)
    requests = server.requests
    for i, size in enumerate(SIZES):
        asked = [r.range for r in requests if r.path == f"/p{i}"]
        assert set(asked) == ranges_of(size) and len(asked) == len(ranges_of(size))
    assert {r.status for r in requests} == {206}
    assert server.bytes_served() == sum(SIZES)
    assert (result.bytes_transferred, result.resumed_from) == (sum(SIZES), 0)
    assert sum(deltas) == sum(SIZES) and min(deltas) > 0


def test_one_stream_per_part_when_ranges_are_off(
    server: FlakyServer, chunks: list[bytes], tmp_path: Path
) -> None:
    parts = serve(server, chunks)
    dest = tmp_path / "whole"
    result = fetch(target(chunks), parts, dest, policy=ONE_STREAM)
    assert_done(result, dest, chunks)
    assert [(r.path, r.range, r.status) for r in server.requests] == [
        ("/p0", None, 200),
        ("/p1", None, 200),
        ("/p2", None, 200),
    ]


def test_a_server_ignoring_range_gets_one_stream_per_part(
    server: FlakyServer, chunks: list[bytes], tmp_path: Path
) -> None:
    parts = serve(server, chunks)
    server.fault("ignore_range", times=-1)
    dest = tmp_path / "whole"
    result = fetch(target(chunks), parts, dest)
    assert_done(result, dest, chunks)
    # The probe's 200 sends the download back to one stream from zero, part after part.
    assert [(r.path, r.range, r.status) for r in server.requests] == [
        ("/p0", f"bytes=0-{STEP - 1}", 200),
        ("/p0", None, 200),
        ("/p1", None, 200),
        ("/p2", None, 200),
    ]
    assert result.bytes_transferred == sum(SIZES)  # the probe's body was not read


def test_a_part_that_stops_early_in_one_stream_is_resumed_within_the_part(
    server: FlakyServer, chunks: list[bytes], tmp_path: Path
) -> None:
    parts = serve(server, chunks)
    server.fault("short", path="/p1", after_bytes=70_000)
    dest = tmp_path / "whole"
    result = fetch(target(chunks), parts, dest, policy=ONE_STREAM)
    assert_done(result, dest, chunks)
    assert [(r.path, r.range, r.status, r.sent) for r in server.requests] == [
        ("/p0", None, 200, SIZES[0]),
        ("/p1", None, 200, 70_000),
        ("/p1", "bytes=70000-", 206, SIZES[1] - 70_000),
        ("/p2", None, 200, SIZES[2]),
    ]


def test_a_corrupt_part_is_downloaded_again_once(
    server: FlakyServer, chunks: list[bytes], tmp_path: Path
) -> None:
    parts = serve(server, chunks)
    # The range holding the middle byte of part 1, which the fault flips (once).
    server.fault("corrupt", path="/p1", range_start=(SIZES[1] // 2) // STEP * STEP)
    dest = tmp_path / "whole"
    result = fetch(target(chunks), parts, dest)
    assert_done(result, dest, chunks)
    per_pass = sum(len(ranges_of(size)) for size in SIZES)
    assert len(server.requests) == 2 * per_pass
    assert result.bytes_transferred == 2 * sum(SIZES)


def test_a_part_corrupt_every_time_is_named(
    server: FlakyServer, chunks: list[bytes], tmp_path: Path
) -> None:
    parts = serve(server, chunks)
    server.fault("corrupt", path="/p1", times=-1)
    flipped = bytearray(chunks[1])
    flipped[len(flipped) // 2] ^= 0xFF
    dest = tmp_path / "whole"
    with pytest.raises(DigestMismatchError) as caught:
        fetch(target(chunks), parts, dest)
    assert caught.value.name == f"{NAME}.part0001"
    assert str(caught.value) == (
        f"{NAME}.part0001: blake3 mismatch: expected {b3(chunks[1])}, got {b3(bytes(flipped))}"
    )
    assert list(tmp_path.iterdir()) == []  # nothing kept: the next try starts clean


def test_parts_that_are_not_the_file_fail_at_once_naming_the_file(
    server: FlakyServer, chunks: list[bytes], tmp_path: Path
) -> None:
    parts = serve(server, chunks)
    wrong = Target(NAME, sum(SIZES), "e" * 64)  # a parts file that lies about the whole
    with pytest.raises(DigestMismatchError) as caught:
        fetch(wrong, parts, tmp_path / "whole")
    assert str(caught.value) == (
        f"{NAME}: blake3 mismatch: expected {'e' * 64}, got {b3(b''.join(chunks))}"
    )
    # Every part was right, so downloading them again could not help: one pass only.
    assert server.bytes_served() == sum(SIZES)
    assert list(tmp_path.iterdir()) == []


def test_a_failing_range_keeps_the_rest_and_the_resume_fetches_only_the_gaps(
    server: FlakyServer, chunks: list[bytes], tmp_path: Path
) -> None:
    parts = serve(server, chunks)
    server.fault("status", status=500, times=-1, path="/p1", range_start=STEP)
    dest = tmp_path / "whole"
    with pytest.raises(DownloadError) as caught:
        fetch(target(chunks), parts, dest)
    assert str(caught.value).startswith(
        f"{NAME}.part0001 (bytes {STEP}-{2 * STEP - 1}): download from "
        f"http://127.0.0.1:{server.port}/p1 failed 2 times in a row (HTTP 500)"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["whole.part", "whole.part.state"]
    done = completed_ranges(tmp_path / "whole.part.state")
    covered = sum(e - s for s, e in done)
    assert 0 < covered < sum(SIZES)
    bad = SIZES[0] + STEP  # where the failing range lies in the whole file
    assert all(not (s <= bad < e) for s, e in done)
    whole = b"".join(chunks)
    on_disk = (tmp_path / "whole.part").read_bytes()
    assert all(on_disk[s:e] == whole[s:e] for s, e in done)

    server.clear_faults()
    server.reset_requests()
    result = fetch(target(chunks), parts, dest)
    assert_done(result, dest, chunks)
    assert server.bytes_served() == sum(SIZES) - covered
    assert (result.resumed_from, result.bytes_transferred) == (covered, sum(SIZES) - covered)
    assert ("/p1", f"bytes={STEP}-{2 * STEP - 1}") in {(r.path, r.range) for r in server.requests}


def test_403_on_a_part_refreshes_that_parts_url(
    server: FlakyServer, chunks: list[bytes], tmp_path: Path
) -> None:
    parts = serve(server, chunks, signed=True)
    server.expire_signatures()
    refreshed: dict[str, str] = {}

    async def refresh(part: BlobSource) -> str:
        assert part.name not in refreshed  # once per part, however many ranges were refused
        refreshed[part.name] = server.signed_url(f"/p{part.name[-1]}")
        return refreshed[part.name]

    dest = tmp_path / "whole"
    result = fetch(target(chunks), parts, dest, refresh_url=refresh)
    assert_done(result, dest, chunks)
    assert sorted(refreshed) == [p.name for p in parts]
    fresh = {url.split("?")[1] for url in refreshed.values()}
    requests = server.requests
    assert {r.query in fresh for r in requests if r.status == 403} == {False}
    assert {r.query in fresh for r in requests if r.status == 206} == {True}
    assert sum(r.status == 206 for r in requests) == sum(len(ranges_of(s)) for s in SIZES)


def test_parts_must_add_up_to_the_file(server: FlakyServer, chunks: list[bytes]) -> None:
    parts = serve(server, chunks)
    with pytest.raises(ValueError, match=rf"^{NAME}: its parts add up to 450000 bytes, but"):
        fetch(Target(NAME, 450_001, "a" * 64), parts, Path("/nonexistent/whole"))
    with pytest.raises(ValueError, match="needs at least one part"):
        fetch(Target(NAME, 0, "a" * 64), [], Path("/nonexistent/whole"))


# A download in a child process, to be killed with SIGKILL half way: argv[1] is a JSON spec.
_CHILD = r"""
import asyncio, json, sys
from pathlib import Path
from gen_worker.models.download import (
    BlobSource, DownloadPolicy, Target, download_parts, make_client,
)
spec = json.loads(sys.argv[1])
policy = DownloadPolicy(**spec["policy"])

async def main():
    async with make_client(policy) as client:
        await download_parts(
            client, Target(*spec["target"]), [BlobSource(*p) for p in spec["parts"]],
            Path(spec["dest"]), policy=policy,
        )

asyncio.run(main())
"""


def test_a_killed_download_resumes_without_fetching_what_it_had_written(
    server: FlakyServer, chunks: list[bytes], tmp_path: Path
) -> None:
    parts = serve(server, chunks)
    # Every range sends half a range at once, then trickles: the child is killed mid-way.
    server.fault("trickle", times=-1, after_bytes=STEP // 2, piece_bytes=4096, delay_s=0.05)
    dest = tmp_path / "whole"
    spec = {
        "policy": {
            "chunk_bytes": 8192,
            "parallel_min_bytes": 256 << 10,
            "range_bytes": STEP,
            "range_workers": 3,
        },
        "target": [NAME, sum(SIZES), b3(b"".join(chunks))],
        "parts": [[p.name, p.url, p.size_bytes, p.blake3] for p in parts],
        "dest": str(dest),
    }
    child = subprocess.Popen([sys.executable, "-c", _CHILD, json.dumps(spec)])
    state = tmp_path / "whole.part.state"
    try:
        deadline = time.monotonic() + 30
        # Killed once its sidecar shows the bursts of three ranges and some trickle.
        while sum(e - s for s, e in completed_ranges(state)) < 3 * (STEP // 2) + 8192:
            assert child.poll() is None and time.monotonic() < deadline
            time.sleep(0.01)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    done = completed_ranges(state)
    covered = sum(e - s for s, e in done)
    whole = b"".join(chunks)
    on_disk = (tmp_path / "whole.part").read_bytes()
    assert len(on_disk) == len(whole)
    assert all(on_disk[s:e] == whole[s:e] for s, e in done)  # the sidecar never overstates

    server.clear_faults()
    server.reset_requests()
    result = fetch(target(chunks), parts, dest)
    assert_done(result, dest, chunks)
    assert (result.resumed_from, server.bytes_served()) == (covered, len(whole) - covered)


# -- through the snapshot fetcher: a split file never lands as parts ---------------------------


def snapshot(server: FlakyServer, chunks: list[bytes]) -> SnapshotManifest:
    """A manifest of a config file and ``unet/w.bin`` split into ``chunks``, served by URL."""
    entries, blobs = split(NAME, b"".join(chunks), [len(c) for c in chunks])
    entries = [entry("config.json", CONFIG), *entries]
    blobs = [CONFIG, *blobs]
    served = [
        msgspec.structs.replace(e, url=server.add(f"/{i}", blob))
        for i, (e, blob) in enumerate(zip(entries, blobs, strict=True))
    ]
    return manifest_of(served)


def pull(store: Store, manifest: SnapshotManifest) -> Path:
    async def go() -> Path:
        fetcher = SnapshotFetcher(store, policy=POLICY)
        try:
            return await fetcher.fetch(manifest)
        finally:
            await fetcher.aclose()

    return asyncio.run(go())


CONFIG = b'{"hidden_size": 8}'


def test_a_split_file_is_fetched_whole_and_never_joined(
    server: FlakyServer, chunks: list[bytes], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    manifest = snapshot(server, chunks)
    joins: list[str] = []
    monkeypatch.setattr(
        parts_module, "reassemble", lambda parts_file, *_: joins.append(parts_file.path)
    )
    store = Store(tmp_path / "cas")
    path = pull(store, manifest)
    whole = b"".join(chunks)
    assert files_under(path) == {"config.json": CONFIG, NAME: whole}
    assert joins == []
    index = manifest.entries[-1]
    # The whole blob, the parts file and the config: no part was ever stored on its own.
    assert blob_files(store) == {b3(whole), index.blake3, b3(CONFIG)}
    assert (path / NAME).stat().st_ino == store.blob_path(b3(whole)).stat().st_ino
    requests = server.requests
    assert [r.path for r in requests[:1]] == [f"/{len(manifest.entries) - 1}"]  # index first
    assert server.bytes_served() == len(whole) + len(CONFIG) + index.size_bytes


def test_parts_already_in_the_store_are_joined_from_there(
    server: FlakyServer, chunks: list[bytes], tmp_path: Path
) -> None:
    manifest = snapshot(server, chunks)
    store = Store(tmp_path / "cas")
    put(store, chunks[0])  # left by an earlier fetch of the parts
    path = pull(store, manifest)
    whole = b"".join(chunks)
    assert files_under(path) == {"config.json": CONFIG, NAME: whole}
    # Only the missing parts travelled; the stored one was joined with them.
    assert (
        server.bytes_served()
        == len(whole) - SIZES[0] + len(CONFIG) + manifest.entries[-1].size_bytes
    )
    assert not store.has_blob(b3(chunks[1])) and not store.has_blob(b3(chunks[0]))
    assert store.has_blob(b3(whole))
